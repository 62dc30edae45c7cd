"""TLS inspection: the inspection CA, leaf certificates minted per host, the ClientHello peek,
verified TLS toward origins, and the glue that bumps an allowed CONNECT tunnel into the same
request path as plain HTTP (see `session.py`)."""
