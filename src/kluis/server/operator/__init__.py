"""The operator's side of a server: subscriptions (plans, renewals, suspension), the operator's
signing key, signed announcements and wipe orders. Services over the ``Store``, called by the
connection handlers, the CLI and the admin console alike."""
