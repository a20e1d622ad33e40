"""Where the project's log records go when the host program has not decided."""

import logging
import sys


def send_package_logs_to_stdout(package):
    """Send the log records of `package` (a logger name) to stdout, which Dassl tees into log.txt,
    unless the host program (our train.py or another) has configured logging already."""
    # Importing dassl.data runs logging.disable(logging.WARNING) (in its wilds module), which
    # would silence every message below ERROR in the whole process.
    logging.disable(logging.NOTSET)
    package_logger = logging.getLogger(package)
    if not logging.getLogger().handlers and not package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
