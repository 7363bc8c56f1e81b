"""`python -m metering_admin`: the `metering-admin` command (INTERFACE.md: every command also
runs as `python -m PACKAGE`).  Its code is the server's (`metering_server.admin_cli`): it
speaks to servers and edits their credentials files."""
