"""CI steps shared by GitHub Actions, `make ci` and the tests (see ci/pipeline.py)."""
