"""The control plane's contract (`v1/`, generated) and its client side: `client` (the stub
behind a cache kept fresh by WatchInvalidations), `cache` (the cache layout the server and
every client share), `model` (what both answer) and `defaults` (task defaults for new runs)."""
