"""The daemon around the server: the command line, logging set-up, the
demo, popauth, and the process models (a process per session, worker
pools, inetd, systemd). Only this package configures logging, installs
signal handlers or changes the process's user for the whole server."""
