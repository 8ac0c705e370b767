"""The OpenAPI pages (/schema: Redoc; /schema/swagger: Swagger UI) from assets inside the package.

Litestar's render plugins load their JavaScript, fonts and favicon from CDNs by default, so the
pages were blank offline. Here every URL they use is served by this API from
`openapi_assets/` (pinned versions, checksums and licences in `openapi_assets/LICENSES.txt`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)

from fluxbase.errors import NotFound

SCHEMA_PATH = "/schema"
ASSETS = f"{SCHEMA_PATH}/assets"

_TYPES = {
    "redoc.standalone.js": "text/javascript",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "LICENSES.txt": "text/plain; charset=utf-8",
    "redoc.standalone.js.LICENSE.txt": "text/plain; charset=utf-8",
    "swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
    "swagger-ui-standalone-preset.js.LICENSE.txt": "text/plain; charset=utf-8",
}
# No favicon request at all (Litestar's default points at a CDN).
_NO_FAVICON = "<link rel='icon' href='data:,'>"


def openapi_config(title: str, version: str) -> OpenAPIConfig:
    """Redoc at /schema and /schema/redoc, Swagger UI at /schema/swagger, plus the JSON and YAML."""
    return OpenAPIConfig(
        title=title,
        version=version,
        path=SCHEMA_PATH,
        render_plugins=[
            RedocRenderPlugin(
                path=["/", "/redoc"],
                js_url=f"{ASSETS}/redoc.standalone.js",
                google_fonts=False,
                favicon=_NO_FAVICON,
            ),
            SwaggerRenderPlugin(
                path="/swagger",
                js_url=f"{ASSETS}/swagger-ui-bundle.js",
                css_url=f"{ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
                favicon=_NO_FAVICON,
            ),
            JsonRenderPlugin(path="/openapi.json"),
            YamlRenderPlugin(path=["/openapi.yaml", "/openapi.yml"]),
        ],
    )


@cache
def _asset(name: str) -> bytes:
    return resources.files("fluxbase.http").joinpath("openapi_assets", name).read_bytes()


@get(f"{ASSETS}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def openapi_asset(name: str) -> Response[bytes]:
    """One vendored file of the OpenAPI pages (a fixed list: no path from the request is opened)."""
    media_type = _TYPES.get(name)
    if media_type is None:
        raise NotFound("No such asset.")
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
