"""A package, so unit test modules may share basenames with e2e ones (test_policy, test_hook)
under pytest's default import mode."""
