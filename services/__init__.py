"""Huiying's four nameko services and the code they share (``services.common``)."""

import warnings

# eventlet announces its own deprecation on import; nameko 2.14 needs it, so the notice is noise.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated")
