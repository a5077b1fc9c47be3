"""The web page's API in-process (Starlette's TestClient): every endpoint against the core API, every error case."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

pytest.importorskip("starlette", reason="the web extra is not installed: pip install 'facevae[web]'")
pytest.importorskip("multipart", reason="the web extra is not installed: pip install 'facevae[web]'")
from starlette.testclient import TestClient  # noqa: E402

from facevae.checkpoint import read_safetensors  # noqa: E402
from facevae.run import Run, load_run  # noqa: E402
from facevae.attributes import load_attribute_vectors  # noqa: E402
from facevae.faces import encode, load_image  # noqa: E402
from facevae.latent import latent_path  # noqa: E402
from facevae.web.app import create_app, static_files  # noqa: E402
from facevae.web.studio import Limits, Studio  # noqa: E402
from web_helpers import ATTRIBUTES, EVAL, make_run, photo_bytes  # noqa: E402

BASE = "http://127.0.0.1"  # the Host a browser sends to `facevae serve`
LIMITS = Limits(max_upload_bytes=200_000, max_pixels=400_000, max_json_bytes=20_000, principal_count=5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("web") / "run")


@pytest.fixture(scope="module")
def studio(run_dir):
    return Studio(run_dir, limits=LIMITS)


@pytest.fixture(scope="module")
def client(studio):
    with TestClient(create_app(studio), base_url=BASE) as c:
        yield c


def png_pixels(data: bytes) -> np.ndarray:
    """A PNG's pixels as uint8 (H, W) for grey, (H, W, C) otherwise."""
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im)


def face_pixels(faces: torch.Tensor) -> np.ndarray:
    """Faces (N, 1, S, S) in [0, 1] side by side, as uint8 (S, N*S): what the API's PNGs hold."""
    arr = (faces.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]  # (N, S, S)
    return arr.permute(1, 0, 2).reshape(arr.shape[1], -1).numpy()


def assert_error(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert re.search(pattern, response.json()["error"]), response.json()


# ---------------------------------------------------------------- the page and its files
def test_the_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        r = client.get(ref)
        assert r.status_code == 200 and len(r.content) > 100, ref
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_the_page_loads_nothing_from_elsewhere():
    files = static_files()
    assert set(files) == {"index.html", "style.css", "app.js"}
    for name, (data, _) in files.items():
        text = data.decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name  # no URL of another host
        assert "@import" not in text and "url(" not in text, name


@pytest.mark.parametrize("path", ["/static/../pyproject.toml", "/static/..%2f..%2fpyproject.toml",
                                  "/static/%2e%2e/%2e%2e/README.md", "/static/..%5c..%5cREADME.md",
                                  "/static/index.html%00.js", "/static/", "/static/web_helpers.py",
                                  "/static/__init__.py", "/../../etc/passwd", "/api/nothing", "/index.html"])
def test_no_file_but_the_packaged_ones_is_served(client, path):
    r = client.get(path)
    assert_error(r, 404, "not found|no such file")


def test_requests_to_another_host_name_are_refused(studio):
    with TestClient(create_app(studio), base_url="http://evil.example") as c:
        assert_error(c.get("/api/info"), 400, "answers only requests to 127.0.0.1")
    with TestClient(create_app(studio), base_url="http://localhost:8000") as c:
        assert c.get("/api/info").status_code == 200
    with TestClient(create_app(studio, allowed_hosts=None), base_url="http://evil.example") as c:
        assert c.get("/api/info").status_code == 200  # --host beyond the loopback answers any name


def test_wrong_methods_get_json_errors(client):
    assert_error(client.post("/api/info"), 405, "Method Not Allowed")
    assert_error(client.get("/api/decode"), 405, "Method Not Allowed")


# ---------------------------------------------------------------- info and directions
def test_info_names_the_run_and_its_numbers(client, run_dir):
    info = client.get("/api/info").json()
    assert info["run"] == run_dir.name
    assert info["config"]["latent_dim"] == info["latent_dim"] == 8
    assert info["bits_per_dim"] == EVAL["nll_iw_bpd"] and info["bits_per_dim_key"] == "nll_iw_bpd"
    assert info["psnr_db"] == EVAL["psnr_db"]
    assert "settings" not in info["eval"]  # only the top-level numbers and names of eval.json
    assert info["attributes"] == ATTRIBUTES
    assert info["principal_directions"] == LIMITS.principal_count


def test_directions_are_the_runs_vectors(client, run_dir):
    body = client.get("/api/directions").json()
    tensors = load_attribute_vectors(run_dir, compute=False)[0]
    assert [d["label"] for d in body["attributes"]] == tensors.names
    for d, v in zip(body["attributes"], tensors.balanced):
        assert torch.allclose(torch.tensor(d["vector"]), v)
    assert [d["id"] for d in body["principal"]] == [f"pc:{i}" for i in range(1, LIMITS.principal_count + 1)]


def test_principal_directions_are_in_standard_deviations_of_the_training_codes(client, run_dir):
    """Along each direction, the training split's posterior means spread by exactly the direction's length, and
    the directions are orthogonal: the PCA of the codes, read back through the API."""
    vae = load_run(run_dir)
    images = Run(run_dir).data(vae.config, "train")
    with torch.no_grad():
        means = vae.encode(images[:].float() / 255).mean.double()  # (N, D)
    body = client.get("/api/directions").json()["principal"]
    v = torch.tensor([d["vector"] for d in body], dtype=torch.float64)  # (k, D)
    unit = v / v.norm(dim=1, keepdim=True)
    spread = (means @ unit.T).std(0)  # (k,)
    assert torch.allclose(spread, v.norm(dim=1), rtol=1e-4)
    assert torch.allclose(unit @ unit.T, torch.eye(len(v), dtype=torch.float64), atol=1e-5)
    assert all(a >= b for a, b in zip(spread, spread[1:]))  # largest first


def test_damaged_eval_numbers_and_vectors_are_left_out(tmp_path):
    run = make_run(tmp_path / "odd")
    (run / "eval.json").write_text('{"elbo_nats": 1, "nll_iw_nats": 1, "likelihood": "gaussian", "elbo_bpd": NaN, '
                                   '"nll_iw_bpd": Infinity, "psnr_db": 18.0}')
    tensors, metadata = read_safetensors(run / "attributes.safetensors")
    tensors["balanced"] = tensors["balanced"][:, :5].contiguous()  # vectors of another latent size
    (run / "attributes.safetensors").write_bytes(st_save(tensors, metadata=metadata))
    with TestClient(create_app(Studio(run, limits=LIMITS)), base_url=BASE) as c:
        info = c.get("/api/info").json()  # valid JSON: no NaN in it
        assert info["bits_per_dim"] is None and info["eval"]["elbo_bpd"] is None and info["psnr_db"] == 18.0
        assert info["attributes"] == [] and any("not 3 finite vectors of 8 numbers" in n for n in info["notes"])
        assert c.get("/api/directions").json()["attributes"] == []


def test_a_run_without_attributes_or_data_says_why(tmp_path):
    run = make_run(tmp_path / "bare", attributes=False, evaluated=False)
    info = Studio(run, limits=LIMITS).info()
    assert info["attributes"] == [] and info["eval"] is None and info["bits_per_dim"] is None
    assert any("no attribute sliders" in n for n in info["notes"])
    assert info["principal_directions"] == LIMITS.principal_count  # the bundled faces are always there
    (run / "config.toml").unlink()  # no config.toml: the weights alone never name data to read
    info = Studio(run, limits=LIMITS).info()
    assert info["principal_directions"] == 0 and any("no principal directions" in n for n in info["notes"])
    assert Studio(run, limits=LIMITS, data="lfw").info()["principal_directions"] == LIMITS.principal_count


# ---------------------------------------------------------------- sample
def test_sample_is_the_prior_face_of_the_core_api(client, run_dir):
    vae = load_run(run_dir)
    png = client.get("/api/sample?seed=7&temperature=0.6")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    want = vae.sample(1, generator=torch.Generator().manual_seed(7), temperature=0.6)  # (1, 1, 32, 32)
    assert np.array_equal(png_pixels(png.content), face_pixels(want))
    body = client.get("/api/sample?seed=7&temperature=0.5&format=json").json()
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(7))[0] * 0.5
    assert torch.allclose(torch.tensor(body["latent"]), z)
    assert client.get("/api/sample?seed=7&temperature=0.6").content == png.content  # seeded
    assert client.get("/api/sample?seed=8&temperature=0.6").content != png.content


@pytest.mark.parametrize("query,pattern", [
    ("seed=abc", "seed must be a whole number"), ("seed=1.5", "seed must be a whole number"),
    ("seed=-1", "seed must be"), ("seed=4294967296", "seed must be .* to 4294967295"),
    ("temperature=x", "temperature must be a number"), ("temperature=nan", "temperature must be from"),
    ("temperature=inf", "temperature must be from"), ("temperature=-1", "temperature must be from"),
    ("temperature=101", "temperature must be from"), ("format=gif", "format must be png or json")])
def test_bad_sample_queries(client, query, pattern):
    assert_error(client.get(f"/api/sample?{query}"), 400, pattern)


# ---------------------------------------------------------------- encode
def test_encode_gives_the_posterior_mean_of_the_centre_square(client, run_dir, tmp_path):
    """The upload's code is the one the latent tools give the same file on disk (`facevae reconstruct --image`)."""
    photo = photo_bytes(160, 100)
    r = client.post("/api/encode", files={"image": ("me.jpg", photo, "image/jpeg")})
    assert r.status_code == 200, r.text
    (tmp_path / "me.jpg").write_bytes(photo)
    face = load_image(tmp_path / "me.jpg", size=32, channels=1)  # centre square, resized as prepare does
    want = encode(load_run(run_dir), face[None])[0]
    assert torch.allclose(torch.tensor(r.json()["latent"]), want, atol=1e-5)
    png = client.post("/api/encode", files={"image": ("me.png", photo_bytes(100, 160, format="PNG"), "image/png")})
    assert png.status_code == 200 and len(png.json()["latent"]) == 8


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with (almost) no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("files,data,pattern", [
    ({"image": ("a.txt", b"hello, not a face", "text/plain")}, None, "not an image"),
    ({"image": ("cut.jpg", photo_bytes(400, 300)[:2000], "image/jpeg")}, None, "cannot be decoded: .*truncated"),
    ({"image": ("big.png", bomb_png(1000, 1000), "image/png")}, None, "1000x1000 = 1,000,000 pixels, over the limit"),
    ({"image": ("bomb.png", bomb_png(100_000, 100_000), "image/png")}, None, "pixels"),
    ({"photo": ("a.jpg", photo_bytes(), "image/jpeg")}, None, "no file in the multipart field 'image'"),
    ({"other": ("a.jpg", b"x", "image/jpeg")}, {"image": "a string"}, "no file in the multipart field 'image'"),
    ({"image": ("a.jpg", b"", "image/jpeg")}, None, "not an image"),
])
def test_bad_uploads_get_400(client, files, data, pattern):
    assert_error(client.post("/api/encode", files=files, data=data), 400, pattern)


def test_two_files_or_no_multipart_get_400(client):
    two = [("image", ("a.jpg", photo_bytes(), "image/jpeg")), ("image", ("b.jpg", photo_bytes(), "image/jpeg"))]
    assert_error(client.post("/api/encode", files=two), 400, "[Tt]oo many files")
    assert_error(client.post("/api/encode", json={"image": "x"}), 400, "multipart/form-data")


def test_uploads_over_the_limit_get_413(client):
    big = b"\xff\xd8" + bytes(LIMITS.max_upload_bytes)
    assert_error(client.post("/api/encode", files={"image": ("big.jpg", big, "image/jpeg")}), 413, "over the limit")
    declared = client.post("/api/encode", content=b"x", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(10 * LIMITS.max_upload_bytes)})
    assert_error(declared, 413, "over the limit")
    assert_error(client.post("/api/encode", content=b"x", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": "lots"}), 400, "Content-Length")
    small = photo_bytes(300, 200)
    assert len(small) < LIMITS.max_upload_bytes
    assert client.post("/api/encode", files={"image": ("ok.jpg", small, "image/jpeg")}).status_code == 200


# ---------------------------------------------------------------- decode and interpolate
def test_decode_is_the_likelihood_mean_and_edits_add_the_vectors(client, run_dir):
    vae = load_run(run_dir)
    z = torch.linspace(-1, 1, 8)
    r = client.post("/api/decode", json={"latent": z.tolist()})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with torch.no_grad():
        assert np.array_equal(png_pixels(r.content), face_pixels(vae.decode(z[None]).mean))
    directions = {d["id"]: torch.tensor(d["vector"]) for k in ("attributes", "principal")
                  for d in client.get("/api/directions").json()[k]}
    edits = {"attribute:Smiling": 1.5, "pc:2": -2}
    edited = client.post("/api/decode", json={"latent": z.tolist(), "edits": edits})
    moved = z + 1.5 * directions["attribute:Smiling"] - 2 * directions["pc:2"]
    with torch.no_grad():
        assert np.array_equal(png_pixels(edited.content), face_pixels(vae.decode(moved[None]).mean))
    assert edited.content != r.content


@pytest.mark.parametrize("body,pattern", [
    ('{"latent": [1, 2, 3]}', r"list of 8 numbers .* got 3 numbers"),
    ('{"latent": "0 0 0 0 0 0 0 0"}', "list of 8 numbers .* got str"),
    ('{"z": [0, 0, 0, 0, 0, 0, 0, 0]}', "list of 8 numbers .* got NoneType"),
    ('[0, 0, 0, 0, 0, 0, 0, 0]', "JSON object"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, "1"]}', "numbers only"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, true]}', "numbers only"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, null]}', "numbers only"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, NaN]}', "non-finite"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, Infinity]}', "non-finite"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, -1e999]}', "non-finite"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 1e300]}', "beyond"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 1' + "0" * 400 + ']}', "beyond"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 0], "edits": {"attribute:Beard": 1}}', "unknown direction"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 0], "edits": {"pc:1": "1"}}', "must be a number"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 0], "edits": {"pc:1": NaN}}', "must be a number"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 0], "edits": {"pc:1": 1e9}}', "must be a number"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0, 0], "edits": [1]}', "edits must be an object"),
    ('{"latent": [0, 0, 0, 0, 0, 0, 0', "must be JSON"),
    (b'\xff\xfe', "must be JSON"),
])
def test_bad_latents_get_400(client, body, pattern):
    r = client.post("/api/decode", content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, pattern)


def test_json_bodies_over_the_limit_get_413(client):
    body = json.dumps({"latent": [0.0] * 8, "pad": "x" * LIMITS.max_json_bytes})
    assert_error(client.post("/api/decode", content=body), 413, "over the limit")


def test_interpolation_runs_from_a_to_b(client, run_dir):
    vae = load_run(run_dir)
    a, b = torch.linspace(-1, 1, 8), torch.linspace(1, -2, 8)
    r = client.post("/api/interpolate", json={"a": {"latent": a.tolist()}, "b": {"latent": b.tolist()}, "steps": 5})
    assert r.status_code == 200
    pixels = png_pixels(r.content)
    assert pixels.shape == (32, 5 * 32)
    path = latent_path(a, b, 5, "slerp")
    with torch.no_grad():
        assert np.array_equal(pixels, face_pixels(vae.decode(path).mean))
        ends = face_pixels(vae.decode(torch.stack([a, b])).mean)
    assert np.array_equal(pixels[:, :32], ends[:, :32]) and np.array_equal(pixels[:, -32:], ends[:, 32:])
    norms = path.norm(dim=1)
    assert (norms >= min(a.norm(), b.norm()) - 1e-5).all() and (norms <= max(a.norm(), b.norm()) + 1e-5).all()
    lerp = client.post("/api/interpolate", json={"a": {"latent": a.tolist()}, "b": {"latent": b.tolist()},
                                                 "steps": 5, "mode": "lerp"})
    assert lerp.status_code == 200 and lerp.content != r.content


@pytest.mark.parametrize("change,pattern", [
    ({"steps": 1}, "steps must be from 2 to"), ({"steps": 1000}, "steps must be from 2 to"),
    ({"steps": "8"}, "whole number"), ({"steps": 2.5}, "whole number"), ({"mode": "cubic"}, "slerp or lerp"),
    ({"a": None}, "a must be a JSON object"), ({"b": {"latent": [1]}}, r"b\.latent must be a list of 8"),
])
def test_bad_interpolations_get_400(client, change, pattern):
    body = {"a": {"latent": [0.0] * 8}, "b": {"latent": [1.0] * 8}, "steps": 4, **change}
    assert_error(client.post("/api/interpolate", json=body), 400, pattern)
