"""The project's leaf package: what every other package may import and which imports none of them.

    errors.py      MMRankError (user-facing), RequestError (INVALID_ARGUMENT), DataError (file, column, row)
    atomic.py      atomic folder and JSON writes
    provenance.py  the commit and machine behind a result

The serving runtime (model_repository/) imports errors.py only; `mmrank repo` copies that module into
every rendered repository beside the runtime, so a rendered repository still deploys on its own.
"""
