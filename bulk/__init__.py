"""petasus.bulk: not built yet; see the open issues."""
