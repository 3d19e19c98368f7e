"""The submit client: pack, upload, submit, follow, deliver — torch-free."""
