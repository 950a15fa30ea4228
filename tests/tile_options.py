"""Run a kernel pair on each option of its GPU autotune lists (the interpreter otherwise runs the
first option only)."""


def option_pairs(query_kernel, dkdv_kernel) -> list[tuple]:
    """(query-kernel option, dk/dv option) pairs that cover every option of both lists."""
    queries, dkdvs = query_kernel.options, dkdv_kernel.options
    return [(queries[min(i, len(queries) - 1)], dkdvs[min(i, len(dkdvs) - 1)])
            for i in range(max(len(queries), len(dkdvs)))]


def pin_options(monkeypatch, kernels, options) -> None:
    """Give each :class:`GroupTunedKernel` of ``kernels`` the one matching option of ``options``."""
    for kernel, option in zip(kernels, options):
        monkeypatch.setattr(kernel, "options", [option])
        monkeypatch.setattr(kernel, "_tuned", {})


def option_id(options) -> str:
    """``rows x warps x stages`` (plus any extra constexprs) of each option."""
    def one(option) -> str:
        extra = "".join(f"{k}{v}" for k, v in (option[3] if len(option) > 3 else {}).items())
        return "x".join(str(v) for v in option[:3]) + extra
    return "-".join(one(option) for option in options)
