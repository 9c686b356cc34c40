"""The data path: accept a client connection (HTTP/1.1 in server.py, HTTP/2 in h2front.py),
parse, choose an upstream (router.py), admit and forward an exchange (exchange.py) over a pooled
upstream connection (upstream.py, h2upstream.py), stream the answer back, and record it
(accesslog.py). The hot modules are compiled with mypyc at install (setup.py)."""
