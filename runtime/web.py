"""``onnxformer web PACKAGE...``: serve a page that runs packages in the browser.

The page (runtime/node/web/) loads each package over HTTP into the JavaScript runtime
(runtime/node with its browser host, host_web.js: onnxruntime-web, Tokenizers.js) and offers
classify / embed / generate / chat there: the model runs in the page, not in this process.
This server only hands out files, from one URL layout (the same one ``--out DIR`` writes as
static files for any web server):

    /                 index.html, app.js            the page
    /packages.json    [{"name", "url"}]              the packages to load
    /packages/NAME/   manifest.json, tokenizer.json, *.onnx, *.onnx_data
    /rt/              the runtime's *.js; rt/node_modules/: onnxruntime-web's dist (its .wasm
                      files, so the page never reaches a CDN), @huggingface/jinja, @huggingface/tokenizers

Every response carries Cross-Origin-Opener-Policy / Cross-Origin-Embedder-Policy, so the page
is cross-origin isolated and onnxruntime-web runs wasm with threads. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import InputError, PackageError

log = logging.getLogger(__name__)

NODE_DIR = Path(__file__).resolve().parent / "node"
# What the page needs from node_modules (folder -> the files of it that are served): onnxruntime-web's
# build with wasm and WebGPU (JSEP) and its wasm binary, the Jinja of chat templates, Tokenizers.js.
VENDORED = {
    "onnxruntime-web/dist": ("ort.all.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm"),
    "@huggingface/jinja/dist": ("index.js",),
    "@huggingface/tokenizers/dist": ("tokenizers.mjs",),
}
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _packages(specs: list[str]) -> dict[str, Path]:
    """NAME=DIR or DIR (named after the folder) -> {name: directory}; each must hold a manifest."""
    found: dict[str, Path] = {}
    for spec in specs:
        name, _, directory = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(directory)
        name = name or path.resolve().name
        if not (path / "manifest.json").is_file():
            raise PackageError(f"{directory} has no manifest.json: pass onnxformer package directories", code="E_MISSING_FILE")
        if name in found:
            raise InputError(f"two packages are named {name!r}: name them, e.g. {name}2={directory}")
        found[name] = path
    return found


def _check_runtime() -> None:
    if not (NODE_DIR / "web" / "index.html").is_file():
        raise PackageError(f"the page is not at {NODE_DIR / 'web'}: onnxformer web serves the JavaScript runtime of a "
                           "source checkout; install it with pip install -e . from the repository", code="E_MISSING_FILE")
    missing = [f"{v}/{f}" for v, files in VENDORED.items() for f in files if not (NODE_DIR / "node_modules" / v / f).is_file()]
    if missing:
        raise PackageError(f"the page needs {', '.join(missing)} under {NODE_DIR / 'node_modules'}: run "
                           f"`npm ci` in {NODE_DIR}", code="E_MISSING_FILE")


def layout(packages: dict[str, Path]) -> dict[str, Path]:
    """URL path prefix -> the folder it is served from (longest prefix first)."""
    routes = {f"/rt/node_modules/{v}/": NODE_DIR / "node_modules" / v for v in VENDORED}
    routes |= {f"/packages/{name}/": path for name, path in packages.items()}
    routes["/rt/"] = NODE_DIR
    routes["/"] = NODE_DIR / "web"
    return dict(sorted(routes.items(), key=lambda kv: -len(kv[0])))


def package_list(packages: dict[str, Path]) -> bytes:
    return json.dumps([{"name": name, "url": f"packages/{name}/"} for name in packages]).encode()


class Handler(SimpleHTTPRequestHandler):
    routes: dict[str, Path] = {}
    listing: bytes = b"[]"
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript", ".mjs": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json"}

    def end_headers(self) -> None:
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] == "/packages.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.listing)))
            self.end_headers()
            self.wfile.write(self.listing)
            return
        super().do_GET()

    def translate_path(self, path: str) -> str:
        path = path.split("?")[0].split("#")[0]
        for prefix, folder in self.routes.items():
            if path.startswith(prefix):
                rest = [p for p in path[len(prefix):].split("/") if p]
                if any(p in (".", "..") or "\\" in p for p in rest):
                    break
                if prefix == "/rt/" and (len(rest) != 1 or not rest[0].endswith(".js")):
                    break  # the runtime's own modules only, not its tests or node_modules
                vendored = VENDORED.get(prefix[len("/rt/node_modules/"):-1])
                if vendored is not None and (len(rest) != 1 or rest[0] not in vendored):
                    break
                target = folder.joinpath(*rest) if rest else folder / "index.html"
                return str(target)
        return str(NODE_DIR / "web" / "missing")

    def list_directory(self, path):  # no listings
        self.send_error(404, "not found")
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


def make_server(packages: dict[str, Path], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server (not yet serving) for `packages`; port 0 picks a free one (server.server_port)."""
    _check_runtime()
    handler = type("PageHandler", (Handler,), {"routes": layout(packages), "listing": package_list(packages)})
    return ThreadingHTTPServer((host, port), partial(handler, directory=str(NODE_DIR / "web")))


def write_static(packages: dict[str, Path], out: Path) -> None:
    """The page, the runtime and the packages as static files in `out` (any web server; for
    threads it must send the headers in ISOLATION_HEADERS)."""
    _check_runtime()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty: pass a new directory")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for prefix, folder in layout(packages).items():
        target = tmp / prefix.strip("/")
        vendored = VENDORED.get(prefix[len("/rt/node_modules/"):-1])
        if prefix == "/rt/" or vendored:
            target.mkdir(parents=True, exist_ok=True)
            for file in vendored or [js.name for js in folder.glob("*.js")]:
                shutil.copy2(folder / file, target / file)
        else:
            shutil.copytree(folder, target, dirs_exist_ok=True)
    (tmp / "packages.json").write_bytes(package_list(packages))
    tmp.replace(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("packages", nargs="+", metavar="PACKAGE", help="package directories (NAME=DIR to name one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--out", type=Path, help="write the page and packages as static files here instead of serving")


def run(args: argparse.Namespace) -> int:
    packages = _packages(args.packages)
    if args.out:
        write_static(packages, args.out)
        print(f"wrote {args.out} (serve it with COOP/COEP headers for wasm threads)")
        return 0
    server = make_server(packages, args.host, args.port)
    print(f"serving {', '.join(packages)} at http://{args.host}:{server.server_port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def serve_in_thread(packages: dict[str, Path]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """For tests: a server on a free 127.0.0.1 port, serving in a daemon thread."""
    server = make_server(packages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
