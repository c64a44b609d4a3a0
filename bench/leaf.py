"""The floor under S3 and S7: a bare twisted.web leaf Resource answering every GET with bytes from memory.

No limits, routing, cache, metrics or log: what twisted.web itself costs an answer, run beside the
ambassador by bench/run (``python bench/leaf.py PORT FILE``) so that its targets can be read against what
the library allows.
"""

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Leaf(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"public, max-age=7000")
        request.setHeader(b"etag", b'"leaf"')  # as the upstream's answers have one (bench/run checks)
        return self.body


class QuietSite(Site):
    def log(self, request):
        pass  # like the peers with their access log off


if __name__ == "__main__":
    port, path = int(sys.argv[1]), sys.argv[2]
    with open(path, "rb") as body:
        reactor.listenTCP(port, QuietSite(Leaf(body.read())), interface="127.0.0.1")
    reactor.run()
