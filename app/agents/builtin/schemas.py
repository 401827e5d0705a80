"""Shared pieces of the built-in agents' input schemas."""

# An absolute http(s) URL with a host; the SSRF guard runs again when it is fetched.
HTTP_URL = {
    "type": "string",
    "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@]+([/?#]\S*)?$",
    "maxLength": 2048,
}
