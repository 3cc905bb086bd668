"""Account identity and device certificates: pure functions, no I/O (see ``chain``)."""
