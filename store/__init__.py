"""petasus.store: not built yet; see the open issues."""
