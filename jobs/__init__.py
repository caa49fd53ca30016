"""Thin entrypoints, one per job: ``python -m jobs.<name>`` and ``ray job submit``.

Each module exposes ``main(argv=None, prog=None) -> int``; the ``vitdit`` console command
(``jobs.cli``) dispatches to them.
"""
