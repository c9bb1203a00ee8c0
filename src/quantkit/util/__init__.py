"""Ground-floor helpers shared by every layer: user-facing errors, atomic outputs, progress."""
