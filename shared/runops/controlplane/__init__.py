"""The control plane's contract (`v1/`, generated) and its client side: `client` (the stub
behind a cache kept fresh by WatchInvalidations) and `cache` (the cache layout the server and
every client share)."""
