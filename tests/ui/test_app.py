"""``postsim ui`` in a real headless browser (Debian's chromium, driven by Selenium) over a real tritonserver."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ExplainedCorpus

from postsim.server.launcher import TritonServer
from postsim.server.ports import free_ports
from postsim.ui.app import UiSettings, make_app

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60


@contextlib.contextmanager
def _serving(server: TritonServer, corpus: ExplainedCorpus, index_dir: Path) -> Iterator[str]:
    """``postsim ui``'s application on a free loopback port, in a thread with its own event loop."""
    from aiohttp import web

    (port,) = free_ports(1)
    settings = UiSettings(corpus=corpus.path, index_dir=index_dir, url=server.endpoints.grpc, port=port)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(settings))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, settings.host, port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{settings.host}:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.fixture(scope="module")
def page_url(explained_server: TritonServer, explained_corpus: ExplainedCorpus) -> Iterator[str]:
    with _serving(explained_server, explained_corpus, explained_corpus.flat) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "THE PAGE WAS NOT TESTED IN A BROWSER: chromium and chromedriver are not installed "
            "(`apt-get install chromium chromium-driver`; .ci/install-browser does it where it may)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S)


def _upload(driver: Any, page_url: str, image: Path, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page_url)
    driver.find_element(By.ID, "image").send_keys(str(image))
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "search").click()


def test_upload_a_post_see_its_neighbours_and_open_an_explanation(
    browser: Any, page_url: str, explained_corpus: ExplainedCorpus
) -> None:
    from selenium.webdriver.common.by import By

    post = explained_corpus.with_image_and_text()[0]
    assert post.image_path is not None and post.text is not None
    _upload(browser, page_url, post.image_path, post.text)
    _wait(browser).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, ".neighbour"))
    neighbours = browser.find_elements(By.CSS_SELECTOR, ".neighbour")
    assert neighbours[0].get_attribute("data-id") == post.id
    assert neighbours[0].find_elements(By.CSS_SELECTOR, ".bar span"), "no score decomposition bar"
    neighbours[1].click()
    picture = _wait(browser).until(lambda driver: driver.find_elements(By.ID, "explanation-picture"))[0]
    _wait(browser).until(lambda _: picture.get_attribute("complete") == "true")
    assert int(picture.get_attribute("naturalWidth")) > 400, "the explanation picture did not load"
    assert browser.find_element(By.ID, "error").text == ""


def test_clicking_an_indexed_post_shows_more_like_it(
    browser: Any, page_url: str, explained_corpus: ExplainedCorpus
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    cards = _wait(browser).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#posts .card"))
    pictures = browser.find_elements(By.CSS_SELECTOR, "#posts .card img")
    _wait(browser).until(lambda _: all(picture.get_attribute("complete") == "true" for picture in pictures))
    broken = [p.get_attribute("alt") for p in pictures if int(p.get_attribute("naturalWidth")) == 0]
    assert not broken, f"thumbnails that did not load: {broken}"
    clicked = cards[3].get_attribute("data-id")
    cards[3].click()
    _wait(browser).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, ".neighbour"))
    assert browser.find_elements(By.CSS_SELECTOR, ".neighbour")[0].get_attribute("data-id") == clicked


def test_a_video_post_is_shown_by_its_middle_frame(page_url: str, explained_corpus: ExplainedCorpus) -> None:
    from PIL import Image

    video = explained_corpus.videos()[0]
    with urllib.request.urlopen(f"{page_url}/api/image/{video.id}", timeout=WAIT_S) as answer:
        assert answer.headers["Content-Type"] == "image/jpeg"
        poster = Image.open(io.BytesIO(answer.read()))
    assert poster.format == "JPEG" and min(poster.size) > 0


def test_an_image_that_does_not_decode_is_named_on_the_page(browser: Any, page_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a picture at all")
    _upload(browser, page_url, broken, "sunset")
    error = _wait(browser).until(lambda driver: driver.find_element(By.ID, "error").text)
    assert "IMAGE: not a decodable image" in error


def _explain_error(page_url: str, target: str) -> str:
    """The error /api/explain answers for a text query against ``target`` (what the page shows)."""
    form = (
        b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nsunset\r\n'
        b'--b\r\nContent-Disposition: form-data; name="target"\r\n\r\n' + target.encode() + b"\r\n--b--\r\n"
    )
    request = urllib.request.Request(
        f"{page_url}/api/explain", data=form, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=WAIT_S)
    assert answer.value.code == 400
    return str(json.loads(answer.value.read())["error"])


def test_the_page_is_told_of_an_unknown_post_and_of_an_index_without_unimodal_vectors(
    page_url: str, explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    assert "post id 'post-99999' is not in the index" in _explain_error(page_url, "post-99999")
    with _serving(explained_server, explained_corpus, explained_corpus.no_unimodal) as without_parts:
        assert "was built without unimodal vectors" in _explain_error(without_parts, "post-00001")
