"""The manifest key for leaving the host: a container image per service or version.

Per service, and per version (a version's image wins over its service's):

    services:
      cart:
        image: ghcr.io/shop/cart:1.4        # used by `meshctl export kubernetes`
        versions:
          v2: {image: ghcr.io/shop/cart:1.5}

Running on one host never reads it: commands run as they are. `meshctl export
kubernetes` needs one for every version (or `--allow-placeholders`).
"""

from __future__ import annotations

from typing import Any

IMAGE_PROPERTY: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "pattern": r"^\S+$",
    "description": "Container image for `meshctl export kubernetes`, e.g. ghcr.io/shop/cart:1.4 [none].",
}

SERVICE_PROPERTIES: dict[str, Any] = {"image": IMAGE_PROPERTY}
VERSION_PROPERTIES: dict[str, Any] = {"image": IMAGE_PROPERTY}


def version_image(version: dict, service: dict) -> str | None:
    """The image of one version: its own, else its service's, else None."""
    return version.get("image", service.get("image"))
