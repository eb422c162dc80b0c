"""Background work of the device registry (none yet: registration and updates are synchronous)."""
