"""The train use case: pre-flight checks, the batch decision and out-of-memory step-down, runs, resumes and sweeps."""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`detector.train` names this package and the API's train(): once the package is imported, Python binds the
    package to the name, so calling it trains (detector.api.train) instead of failing with 'not callable'."""

    def __call__(self, *args, **kwargs):
        from detector import api

        return api.train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
