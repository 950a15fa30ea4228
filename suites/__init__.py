"""The verification suites. Importing this package registers every suite module listed here."""

import importlib

SUITE_MODULES: tuple[str, ...] = ("decode", "causality", "compile", "eq9", "eq10", "equivalence", "gradcheck",
                                  "needle", "parity", "performance", "trainability")

for _module in SUITE_MODULES:
    importlib.import_module(f"suites.{_module}")
