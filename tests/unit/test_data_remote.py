"""Remote sources read from a real HTTP server on localhost, with failures injected."""

from __future__ import annotations

import functools
import http.server
import logging
import shutil
import threading
from collections import Counter, defaultdict

import pytest

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.readers import RemoteReadError
from data_pipelines.shards import ShardResolutionError, resolve_shards
from tests.unit.test_data_fixtures import assert_same_batches, make_config, take
from tests.unit.test_data_sources import write_format


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; `server.faults[path]` lists what the next requests of a path get:
    an HTTP status to fail with, "cut" (the headers promise the whole file, the body stops
    halfway and the connection closes) or "short" (a well-formed response of a file cut
    short)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_HEAD(self):
        self.server.requests[self.path] += 1
        super().do_HEAD()

    def do_GET(self):
        self.server.requests[self.path] += 1
        faults = self.server.faults[self.path]
        fault = faults.pop(0) if faults else None
        if isinstance(fault, int):
            self.send_error(fault)
        elif fault == "short":  # a complete response of the file's first half
            body = (self.server.root / self.path.lstrip("/")).read_bytes()[:-40]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif fault == "cut":
            body = (self.server.root / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(FaultyHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.root, httpd.faults, httpd.requests = root, defaultdict(list), Counter()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(server, local: str) -> str:
    """Copy a local file into the served directory; its URL."""
    name = local.rsplit("/", 1)[-1]
    shutil.copy(local, server.root / name)
    return f"{server.url}/{name}"


def batches(tmp_path, paths: list[str], count: int = 6, **overrides) -> list[dict]:
    settings = {"shuffle": False, "retry_backoff_s": 0.01, **overrides}
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=paths)], **settings)
    return take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), count)


@pytest.mark.parametrize("fmt", ["jsonl", "json.gz", "json.zst", "text", "parquet"])
def test_a_served_file_gives_the_local_files_tokens(tmp_path, server, fmt):
    local = write_format(tmp_path, fmt)
    assert_same_batches(batches(tmp_path, [local]), batches(tmp_path, [serve(server, local)]))


def test_a_url_glob_lists_the_served_directory(tmp_path, server):
    local = write_format(tmp_path, "jsonl")
    for name in ("b.jsonl", "a.jsonl"):
        shutil.copy(local, server.root / name)
    (server.root / "notes.txt").write_text("not a jsonl file\n")
    assert_same_batches(
        batches(tmp_path, [local, local], count=12),
        batches(tmp_path, [f"{server.url}/*.jsonl"], count=12),
    )


@pytest.mark.parametrize("faults", [[503, 503], ["cut"], ["cut", 500, "cut"]])
def test_failed_reads_are_retried_from_where_they_broke(tmp_path, server, caplog, faults):
    local = write_format(tmp_path, "jsonl")
    url = serve(server, local)
    expected = batches(tmp_path, [local])
    server.faults["/docs.jsonl"] = list(faults)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.readers"):
        assert_same_batches(expected, batches(tmp_path, [url]))
    retries = [record for record in caplog.records if "retry" in record.getMessage()]
    assert len(retries) == len(faults)
    assert server.faults["/docs.jsonl"] == []


def test_a_server_that_keeps_failing_ends_in_a_clear_error(tmp_path, server, caplog):
    url = serve(server, write_format(tmp_path, "jsonl"))
    server.faults["/docs.jsonl"] = [503] * 10
    with caplog.at_level(logging.WARNING, logger="data_pipelines.readers"):
        with pytest.raises(RemoteReadError, match=r"docs\.jsonl failed 4 times"):
            batches(tmp_path, [url], max_retries=4, retry_backoff_s=0.01)
    assert len(server.faults["/docs.jsonl"]) == 10 - 4
    waits = [record.getMessage().rsplit(" in ", 1)[1] for record in caplog.records]
    assert waits == ["0.01s", "0.02s", "0.04s"]


def test_a_missing_remote_file_is_not_retried(tmp_path, server):
    with pytest.raises(RemoteReadError, match=r"gone\.jsonl: no such remote file"):
        batches(tmp_path, [f"{server.url}/gone.jsonl"], max_retries=5)
    assert server.requests["/gone.jsonl"] <= 2  # one HEAD, one GET: no second attempt


def test_a_url_that_cannot_be_listed_is_named_in_the_error(tmp_path, server):
    with pytest.raises(ShardResolutionError, match=r"nothing/\*\.jsonl: no data files found"):
        resolve_shards(SourceConfig(name="a", paths=[f"{server.url}/nothing/*.jsonl"]), "")
    unreachable = "http://127.0.0.1:9/corpus/*.jsonl"  # the discard port: nothing listens
    with pytest.raises(ShardResolutionError, match=r"corpus/\*\.jsonl: cannot list it"):
        resolve_shards(SourceConfig(name="a", paths=[unreachable]), "")


def test_a_compressed_file_served_short_is_read_again_before_it_counts_as_truncated(
    tmp_path, server
):
    local = write_format(tmp_path, "json.gz")
    url = serve(server, local)
    server.faults["/docs.jsonl.gz"] = ["short"]
    loader_batches = batches(tmp_path, [url])
    assert_same_batches(batches(tmp_path, [local]), loader_batches)
    assert server.faults["/docs.jsonl.gz"] == []
    server.faults["/docs.jsonl.gz"] = ["short"] * 3  # every attempt: a truncated file
    cfg = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[url])],
        shuffle=False,
        max_retries=3,
        retry_backoff_s=0.01,
    )
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 30)  # past the end of the file, and on into the next epoch
    assert loader.bad_input_counts() == {"truncated_file": 1}
    assert server.faults["/docs.jsonl.gz"] == []
