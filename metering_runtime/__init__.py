"""What both daemons run on, owned by neither: listeners, the bounded request loop, task
ownership, durable atomic writes, logs, token files and CLI exit codes.

It may import `metering_protocol` (the wire); it never imports `metering_server` or
`metering_client`, and they never import each other — both import this instead.
"""
