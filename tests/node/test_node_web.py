"""WebEnv against a loopback HTTP server (no outside network)."""

from __future__ import annotations

from .conftest import Node

WEB = "WebEnv_"


def test_browse_returns_readable_text_title_and_links(node: Node, web_url: str) -> None:
    text = node.ok(WEB + "browse_website", url=f"{web_url}/page.html", goals_to_browse="otters")
    assert "Title: Otter Facts" in text
    assert "Sea otters hold hands while sleeping" in text
    assert "secretScript" not in text and "color: red" not in text
    assert f"Other page ({web_url}/other.html)" in text
    assert "External link (https://example.org/x)" in text


def test_browse_follows_redirects(node: Node, web_url: str) -> None:
    text = node.ok(WEB + "browse_website", url=f"{web_url}/redirect", goals_to_browse="")
    assert text.startswith(f"URL: {web_url}/page.html")


def test_long_pages_keep_the_parts_matching_the_goals(node: Node, web_url: str) -> None:
    text = node.ok(
        WEB + "browse_website", url=f"{web_url}/long.html", goals_to_browse="where is the treasure buried"
    )
    assert "The treasure is buried under the old oak." in text
    assert len(text) <= 4000 + 100
    assert "shortened" in text


def test_browse_errors(node: Node, web_url: str) -> None:
    missing = node.run(WEB + "browse_website", url=f"{web_url}/nope", goals_to_browse="")
    assert missing.status_code == 500 and "404" in missing.json()["detail"]
    assert node.run(WEB + "browse_website", url="file:///etc/passwd").status_code == 422
    assert node.run(WEB + "browse_website", url="not a url").status_code == 422
    image = node.run(WEB + "browse_website", url=f"{web_url}/image.png")
    assert image.status_code == 500 and "image/png" in image.json()["detail"]
    refused = node.run(WEB + "browse_website", url="http://127.0.0.1:9/")  # nothing listens on port 9
    assert refused.status_code == 500 and "cannot fetch" in refused.json()["detail"]


def test_search_and_browse_uses_the_configured_api(node: Node, web_url: str) -> None:
    results = node.ok(
        WEB + "search_and_browse", search_query="otters", goals_to_browse="sleep", num_results=3
    )
    assert [r["title"] for r in results] == ["Otter Facts", "Other", "Missing"]
    assert "hold hands" in results[0]["page"]
    assert "The other page." in results[1]["page"]
    assert "could not read the page" in results[2]["page"]


def test_search_without_configuration_says_so(make_node) -> None:  # type: ignore[no-untyped-def]
    plain = make_node()
    response = plain.run(WEB + "search_and_browse", search_query="otters", goals_to_browse="x")
    assert response.status_code == 500
    assert "web search is not configured" in response.json()["detail"]
