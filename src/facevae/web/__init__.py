"""The web page of `facevae serve`: a view of the latent tools (encode, decode, sample, directions, interpolation).

    studio.py    the model side: a loaded run, its directions, faces in and out as PNG bytes (no HTTP)
    app.py       the HTTP side: routes, limits, JSON errors (Starlette; the `web` extra)
    server.py    `facevae serve`: binding, the URL, uvicorn, Ctrl-C
    static/      the page: index.html, style.css, app.js (shipped in the package; nothing from a CDN)
"""
