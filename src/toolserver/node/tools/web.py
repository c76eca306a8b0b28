"""WebEnv: read a web page's text (httpx + BeautifulSoup, no browser); web search via a configured API."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urljoin, urlsplit

from toolserver.errors import ToolArgumentError, ToolError
from toolserver.node.registry import Env, tool

_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "iframe", "head")
_WORD = re.compile(r"\w+")
_MAX_LINKS = 40


def _html_to_text(html: str, base_url: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(title, readable text, [(link text, absolute url)]) of an HTML page."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_DROP_TAGS):
        tag.decompose()
    links: list[tuple[str, str]] = []
    seen: set[str] = set()
    for a in soup.find_all("a", href=True):
        label = a.get_text(" ", strip=True)
        href = urljoin(base_url, a["href"])
        if label and href.startswith(("http://", "https://")) and href not in seen:
            seen.add(href)
            links.append((label, href))
    text = soup.get_text("\n")
    lines = (re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.splitlines())
    return title, "\n".join(line for line in lines if line), links


def _focus(text: str, goals: str, limit: int) -> tuple[str, bool]:
    """Fit ``text`` into ``limit`` characters, keeping the paragraphs that share most words with ``goals``."""
    if len(text) <= limit:
        return text, False
    paragraphs = text.split("\n")
    wanted = {w.lower() for w in _WORD.findall(goals) if len(w) > 2}
    scored = sorted(
        range(len(paragraphs)),
        key=lambda i: (-len(wanted & {w.lower() for w in _WORD.findall(paragraphs[i])}), i),
    )
    keep: set[int] = set()
    size = 0
    for i in scored:
        if size + len(paragraphs[i]) + 1 > limit:
            continue
        keep.add(i)
        size += len(paragraphs[i]) + 1
    return "\n".join(paragraphs[i] for i in sorted(keep)), True


class WebEnv(Env):
    """The web: read a page's text, or search the web and read the top results."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._client: Any = None

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            cfg = self.ctx.config
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                timeout=cfg.web_timeout,
                headers={"User-Agent": cfg.web_user_agent},
                max_redirects=10,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _check_online(self, url: str) -> None:
        """ToolError naming the reason when the node has no network and ``url`` is not on loopback."""
        offline = self.ctx.config.offline
        host = (urlsplit(url).hostname or "").lower()
        if offline and host != "localhost" and not host.startswith("127.") and host != "::1":
            raise ToolError(f"this node has no network, so it cannot reach {url}: {offline}")

    async def _fetch(self, url: str) -> tuple[str, str, str]:
        """(final url, content type, decoded body) of ``url``, at most web_max_bytes long."""
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ToolArgumentError(f"argument 'url': {url!r} is not an http(s) URL")
        self._check_online(url)
        cap = self.ctx.config.web_max_bytes
        try:
            async with self._http().stream("GET", url) as response:
                if response.status_code >= 400:
                    raise ToolError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
                chunks, size, cut = [], 0, False
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= cap:
                        cut = True
                        break
                body = b"".join(chunks)[:cap]
                encoding = response.charset_encoding or "utf-8"
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                final = str(response.url)
        except httpx.HTTPError as exc:
            raise ToolError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
        try:
            text = body.decode(encoding, errors="replace")
        except LookupError:
            text = body.decode("utf-8", errors="replace")
        if cut:
            text += "\n[page cut: it is larger than the node's web_max_bytes]"
        return final, ctype, text

    @tool
    async def browse_website(self, url: str, goals_to_browse: str = "") -> str:
        """Open an http(s) URL and return the page's readable text, its title and its links.

        Long pages are shortened to the parts that match goals_to_browse best.

        Args:
            url: The full web address, starting with http:// or https://.
            goals_to_browse: What you want to find on the page; used to pick the relevant parts of long pages.
        """
        import anyio.to_thread

        final, ctype, body = await self._fetch(url)
        limit = self.ctx.config.max_output_chars
        if ctype in ("text/html", "application/xhtml+xml", "") or (
            ctype.endswith("xml") and "<html" in body[:2000]
        ):
            title, text, links = await anyio.to_thread.run_sync(_html_to_text, body, final)
        elif (
            ctype.startswith("text/")
            or ctype in ("application/json", "application/xml")
            or ctype.endswith("+json")
        ):
            title, text, links = "", body, []
        else:
            raise ToolError(f"{final} is {ctype}, not a text page; download it with the shell instead")
        link_text = "".join(f"- {label} ({href})\n" for label, href in links[:_MAX_LINKS])
        header = f"URL: {final}\n" + (f"Title: {title}\n" if title else "") + "\n"
        room = max(1000, limit - len(header) - min(len(link_text), limit // 4) - 60)
        text, cut = _focus(text, goals_to_browse, room)
        out = header + text
        if cut:
            out += "\n[page shortened to the parts closest to the goals]"
        if link_text:
            out += "\n\nLinks:\n" + link_text[: limit // 4]
        return out

    @tool
    async def search_and_browse(
        self, search_query: str, goals_to_browse: str, region: str | None = None, num_results: int = 3
    ) -> list[dict[str, Any]]:
        """Search the web, then read the top results; returns each result's title, URL, snippet and page text.

        Args:
            search_query: What to search for.
            goals_to_browse: What you want to find on the result pages.
            region: Market or language code for the search, e.g. 'en-US'.
            num_results: How many results to read (1-10).
        """
        cfg = self.ctx.config
        if not cfg.web_search_url:
            raise ToolError(
                "web search is not configured on this node: set web_search_url (and web_search_api_key, "
                "web_search_provider) in the node config; browse_website works without it"
            )
        num_results = max(1, min(num_results, 10))
        hits = await self._search(search_query, region, num_results)
        results = []
        for hit in hits[:num_results]:
            try:
                page = await self.browse_website(hit["url"], goals_to_browse)
            except ToolError as exc:
                page = f"(could not read the page: {exc})"
            results.append({**hit, "page": page[: cfg.max_output_chars // num_results]})
        if not results:
            raise ToolError(f"the search for {search_query!r} found nothing")
        return results

    async def _search(self, query: str, region: str | None, count: int) -> list[dict[str, str]]:
        import httpx

        cfg = self.ctx.config
        self._check_online(str(cfg.web_search_url))
        key = cfg.web_search_api_key.get_secret_value() if cfg.web_search_api_key else None
        headers: dict[str, str] = {}
        if cfg.web_search_provider == "bing":
            params: dict[str, Any] = {"q": query, "count": count}
            if region:
                params["mkt"] = region
            if key:
                headers["Ocp-Apim-Subscription-Key"] = key
        else:  # searxng
            params = {"q": query, "format": "json"}
            if region:
                params["language"] = region
            if key:
                headers["Authorization"] = f"Bearer {key}"
        try:
            response = await self._http().get(cfg.web_search_url, params=params, headers=headers)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ToolError(f"the search API failed: {type(exc).__name__}: {exc}") from exc
        if cfg.web_search_provider == "bing":
            items = (data.get("webPages") or {}).get("value") or []
            return [
                {"title": i.get("name", ""), "url": i.get("url", ""), "snippet": i.get("snippet", "")}
                for i in items
                if i.get("url")
            ]
        return [
            {"title": i.get("title", ""), "url": i.get("url", ""), "snippet": i.get("content", "")}
            for i in data.get("results") or []
            if i.get("url")
        ]
