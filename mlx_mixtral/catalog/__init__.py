"""Which models this machine has, and what each is, said for people: `list`, the app's model
picker, `info` and the servers' model listings read the same descriptions."""
