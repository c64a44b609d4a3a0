# The `twistd ambassador` command. Dropin only: the code lives in ambassador.app.service.
from twisted.application.service import ServiceMaker

ambassador = ServiceMaker(
    "ambassador",
    "ambassador.app.service",
    "Sidecar that calls outside APIs (TMDB, ...) for the main container, with the credentials injected.",
    "ambassador",
)
