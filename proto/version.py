"""Protocol version. Every top-level message carries `v` = the major version.

Minor, backward-compatible changes (new optional fields) do not bump anything: receivers
ignore fields they do not know. A new major version means an incompatible change and is
refused by receivers of an older major.
"""

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
