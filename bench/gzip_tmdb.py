#!/usr/bin/env python3
"""What gzip buys for TMDB-sized answers: bytes on the wire, and the CPU the ambassador spends decoding.

Two TMDB-shaped answers: a ``/3/movie/{id}`` detail (the shape TMDB documents,
with its production companies, genres and languages) and a ``/3/discover/movie``
page of 20 results (``bench/run``'s page, the nginx upstream's). For each:

- bytes identity against gzip at levels 1, 6 (zlib's and nginx's default) and 9;
- the CPU of decoding one answer: zlib in one call, and the ambassador's
  bounded decoder (``ambassador.pipeline.decoding``) as the client runs it, fed
  as TCP reads arrive;
- a whole fetch over loopback through ``UpstreamClient`` (a twisted.web server
  in the same process answering pre-built bytes, gzip only when asked): CPU per
  answer for the process, identity against gzip.

Run it with the ambassador installed: ``.venv/bin/python bench/gzip_tmdb.py``
(``--fetches N`` per round, default 1000; the best of 5 rounds). It prints one table; paste it into
bench/RESULTS.md with the date and machine. Loopback has no bandwidth cost, so
the fetch row shows the CPU side only; the bytes rows are the network side.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.machinery
import importlib.util
import json
import random
import string
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
READ = 16 * 1024  # what one TCP read of a loopback or internet answer tends to hand the client
ROUNDS = 5


def discover_page() -> bytes:
    """bench/run's page: the same bytes the nginx upstream serves there."""
    loader = importlib.machinery.SourceFileLoader("bench_run", str(HERE / "run"))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    assert spec is not None
    run = importlib.util.module_from_spec(spec)
    loader.exec_module(run)
    return run.discover_page()


def movie_detail() -> bytes:
    """A /3/movie/{id} answer shaped as TMDB documents it (no append_to_response)."""
    rng = random.Random(550)
    symbols = string.ascii_letters + string.digits

    def image() -> str:
        return "/" + "".join(rng.choices(symbols, k=27)) + ".jpg"

    document = {
        "adult": False, "backdrop_path": image(),
        "belongs_to_collection": None, "budget": 63000000,
        "genres": [{"id": 18, "name": "Drama"}, {"id": 53, "name": "Thriller"}, {"id": 35, "name": "Comedy"}],
        "homepage": "http://www.foxmovies.com/movies/fight-club", "id": 550, "imdb_id": "tt0137523",
        "origin_country": ["US"], "original_language": "en", "original_title": "Fight Club",
        "overview": ("A ticking-time-bomb insomniac and a slippery soap salesman channel primal male aggression "
                     "into a shocking new form of therapy. Their concept catches on, with underground \"fight "
                     "clubs\" forming in every town, until an eccentric gets in the way and ignites an "
                     "out-of-control spiral toward oblivion."),
        "popularity": 61.416, "poster_path": image(),
        "production_companies": [
            {"id": 508, "logo_path": image(), "name": "Regency Enterprises", "origin_country": "US"},
            {"id": 711, "logo_path": image(), "name": "Fox 2000 Pictures", "origin_country": "US"},
            {"id": 20555, "logo_path": image(), "name": "Taurus Film", "origin_country": "DE"},
            {"id": 54051, "logo_path": None, "name": "Atman Entertainment", "origin_country": ""},
            {"id": 54052, "logo_path": None, "name": "Knickerbocker Films", "origin_country": "US"},
            {"id": 4700, "logo_path": image(), "name": "The Linson Company", "origin_country": "US"},
            {"id": 25, "logo_path": image(), "name": "20th Century Fox", "origin_country": "US"},
        ],
        "production_countries": [{"iso_3166_1": "DE", "name": "Germany"},
                                 {"iso_3166_1": "US", "name": "United States of America"}],
        "release_date": "1999-10-15", "revenue": 100853753, "runtime": 139,
        "spoken_languages": [{"english_name": "English", "iso_639_1": "en", "name": "English"}],
        "status": "Released", "tagline": "Mischief. Mayhem. Soap.", "title": "Fight Club", "video": False,
        "vote_average": 8.438, "vote_count": 30122,
    }
    return json.dumps(document).encode()


def per_call(action, seconds: float = 0.5) -> float:
    """CPU seconds per call of ``action``, over at least ``seconds`` of CPU."""
    calls, started = 0, time.process_time()
    while (spent := time.process_time() - started) < seconds:
        for _ in range(100):
            action()
        calls += 100
    return spent / calls


def bounded_decode(packed: bytes, size: int):
    """One decode as the client runs it: DecodingAgent's protocol into a reader, one TCP read at a time."""
    from twisted.internet.protocol import Protocol
    from twisted.web.client import ResponseDone
    from twisted.python.failure import Failure

    from ambassador.pipeline.decoding import _Gunzipping  # our own module's, for this measurement

    class Producer:
        def stopProducing(self):
            pass

    class Reader(Protocol):
        def __init__(self):
            self.parts = []

        def dataReceived(self, data):
            self.parts.append(data)

    reads = [packed[i:i + READ] for i in range(0, len(packed), READ)]
    done = Failure(ResponseDone())

    def decode():
        reader = Reader()
        gunzipping = _Gunzipping(reader)
        gunzipping.makeConnection(Producer())
        for read in reads:
            gunzipping.dataReceived(read)
        gunzipping.connectionLost(done)
        return reader

    assert sum(map(len, decode().parts)) == size
    return decode


async def fetch_cpu(answers: dict[str, bytes], fetches: int) -> dict[tuple[str, str], float]:
    """CPU per fetch through UpstreamClient over loopback, by (answer, accept_encoding)."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from ambassador.exchange import UpstreamRequest
    from ambassador.pipeline.client import UpstreamClient
    from ambassador.testing import serve

    packed = {name: gzip.compress(body, 6) for name, body in answers.items()}

    class Prebuilt(Resource):
        isLeaf = True

        def render_GET(self, request):
            name = request.path.decode().strip("/")
            request.setHeader("Content-Type", "application/json;charset=utf-8")
            if b"gzip" in (request.getHeader("accept-encoding") or "").encode():
                request.setHeader("Content-Encoding", "gzip")
                return packed[name]
            return answers[name]

    results: dict[tuple[str, str], float] = {}
    port = serve(Prebuilt())
    client = UpstreamClient(reactor)
    try:
        for name in answers:
            request = UpstreamRequest("GET", "/" + name)
            for _ in range(ROUNDS):  # alternating, the best round of each: the machine's other load moves both
                for encoding in ("identity", "gzip"):
                    for _ in range(50):  # warm: the connection made, the code paths run
                        await client.fetch(port.base_url, request, accept_encoding=encoding)
                    started = time.process_time()
                    for _ in range(fetches):
                        response = await client.fetch(port.base_url, request, accept_encoding=encoding)
                    spent = (time.process_time() - started) / fetches
                    results[name, encoding] = min(spent, results.get((name, encoding), spent))
                    assert response.body == answers[name]
    finally:
        await client.close()
        await port.stopListening()
    return results


async def measure(fetches: int) -> None:
    answers = {"movie-detail": movie_detail(), "discover-page": discover_page()}
    rows = ["answer          identity B  gzip-1 B  gzip-6 B  gzip-9 B  ratio(6)  zlib µs  bounded µs",
            "--------------  ----------  --------  --------  --------  --------  -------  ----------"]
    for name, body in answers.items():
        sizes = {level: len(gzip.compress(body, level)) for level in (1, 6, 9)}
        packed = gzip.compress(body, 6)
        one_call = per_call(lambda packed=packed: zlib.decompress(packed, 16 + zlib.MAX_WBITS))
        bounded = per_call(bounded_decode(packed, len(body)))
        rows.append(f"{name:<14}  {len(body):>10}  {sizes[1]:>8}  {sizes[6]:>8}  {sizes[9]:>8}  "
                    f"{len(body) / sizes[6]:>7.2f}×  {one_call * 1e6:>7.1f}  {bounded * 1e6:>10.1f}")
    cpu = await fetch_cpu(answers, fetches)
    rows += ["", f"loopback fetch through UpstreamClient, CPU per answer (client and server in one process; best of {ROUNDS})",
             "answer          identity µs  gzip µs  gzip - identity µs",
             "--------------  -----------  -------  ------------------"]
    for name in answers:
        identity, gzipped = cpu[name, "identity"] * 1e6, cpu[name, "gzip"] * 1e6
        rows.append(f"{name:<14}  {identity:>11.1f}  {gzipped:>7.1f}  {gzipped - identity:>+18.1f}")
    print("\n".join(rows))


def main() -> None:
    from twisted.internet import defer, task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetches", type=int, default=1000, help="fetches per round of the loopback measurement")
    options = parser.parse_args()
    task.react(lambda _: defer.ensureDeferred(measure(options.fetches)))


if __name__ == "__main__":
    main()
