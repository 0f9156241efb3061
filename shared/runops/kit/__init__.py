"""The runtime kit every runops service is built with (server bootstrap, errors, auth, ids, ...)."""
