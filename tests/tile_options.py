"""Run a kernel pair on each option of its GPU autotune lists (the interpreter otherwise runs the
first option only)."""

import contextlib


def option_pairs(query_kernel, dkdv_kernel) -> list[tuple]:
    """(query-kernel option, dk/dv option) pairs that cover every option of both lists."""
    queries, dkdvs = query_kernel.options, dkdv_kernel.options
    return [(queries[min(i, len(queries) - 1)], dkdvs[min(i, len(dkdvs) - 1)])
            for i in range(max(len(queries), len(dkdvs)))]


@contextlib.contextmanager
def pinned(kernels, options):
    """Each :class:`GroupTunedKernel` of ``kernels`` runs the matching option of ``options`` only."""
    with contextlib.ExitStack() as stack:
        for kernel, option in zip(kernels, options):
            stack.enter_context(kernel.only(option))
        yield


def option_id(options) -> str:
    """``rows x warps x stages`` (plus any extra constexprs) of each option."""
    def one(option) -> str:
        extra = "".join(f"{k}{v}" for k, v in (option[3] if len(option) > 3 else {}).items())
        return "x".join(str(v) for v in option[:3]) + extra
    return "-".join(one(option) for option in options)
