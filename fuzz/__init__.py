"""Coverage-guided fuzzing of every decoder a peer reaches (docs/fuzzing.md).

One module per decoder, each with a ``HARNESS`` (``_kit.Harness``); ``python -m fuzz.run`` runs
them under atheris. Not installed with petasus: it lives beside the tests.
"""
