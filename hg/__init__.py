"""petasus.hg: not built yet; see the open issues."""
