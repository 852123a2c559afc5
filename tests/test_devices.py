"""Device attributes from device_id (reference §6): real user agents, IMAP ID strings, app ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from trackalert.devices import HTTP_KEYS, IMAP_KEYS, MOBILEAPI_KEYS, DeviceParser

CHROME_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")
SAFARI_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1")
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/119.0.6045.163 Mobile Safari/537.36")


@pytest.fixture(scope="module")
def parser() -> DeviceParser:
    return DeviceParser()


@pytest.mark.parametrize(("ua", "expected"), [
    (CHROME_MAC, {"device.family": "Mac", "device.brand": "Apple", "device.model": "Mac",
                  "os.family": "Mac OS X", "os.major": "10", "os.minor": "15",
                  "browser.family": "Chrome", "browser.major": "120", "browser.minor": "0"}),
    (SAFARI_IPHONE, {"device.family": "iPhone", "device.brand": "Apple", "device.model": "iPhone",
                     "os.family": "iOS", "os.major": "17", "os.minor": "1",
                     "browser.family": "Mobile Safari", "browser.major": "17", "browser.minor": "1"}),
    (FIREFOX_WINDOWS, {"device.family": "Other", "device.brand": "", "device.model": "",
                       "os.family": "Windows", "os.major": "10", "os.minor": "",
                       "browser.family": "Firefox", "browser.major": "121", "browser.minor": "0"}),
    (CHROME_ANDROID, {"device.family": "Samsung SM-S918B", "device.brand": "Samsung",
                      "device.model": "SM-S918B", "os.family": "Android", "os.major": "13",
                      "os.minor": "", "browser.family": "Chrome Mobile", "browser.major": "119",
                      "browser.minor": "0"}),
])
def test_browsers(parser: DeviceParser, ua: str, expected: dict) -> None:
    assert parser.attributes("https", ua) == expected
    assert parser.attributes("http", ua) == expected


def test_unknown_user_agent_defaults_families_to_other(parser: DeviceParser) -> None:
    attrs = parser.attributes("http", "zzz nothing known")
    assert set(attrs) == set(HTTP_KEYS)
    assert (attrs["device.family"], attrs["os.family"], attrs["browser.family"]) == ("Other",) * 3
    assert attrs["browser.major"] == attrs["device.model"] == ""


@pytest.mark.parametrize(("device_id", "expected"), [
    ('"name" "Thunderbird" "version" "115.5.0"',
     {"imapc.family": "Thunderbird", "imapc.major": "115", "imapc.minor": "5",
      "os.family": "", "os.major": "", "os.minor": ""}),
    ('"name" "Mac OS X Mail" "version" "16.0 (3731.700.6)" "os" "Mac OS X" "os-version" '
     '"13.4 (22F66)" "vendor" "Apple Inc."',
     {"imapc.family": "Mac OS X Mail", "imapc.major": "16", "imapc.minor": "0",
      "os.family": "Mac OS X", "os.major": "13", "os.minor": "4"}),
    ('"name" "iPhone Mail" "version" "20F66" "os" "iOS" "os-version" "16.5 (20F66)"',
     {"imapc.family": "iPhone Mail", "imapc.major": "", "imapc.minor": "",
      "os.family": "iOS", "os.major": "16", "os.minor": "5"}),
    ('"name" "Microsoft Outlook" "version" "16.0.17029.20068" "os" "Windows" "os-version" "10.0"',
     {"imapc.family": "Microsoft Outlook", "imapc.major": "16", "imapc.minor": "0",
      "os.family": "Windows", "os.major": "10", "os.minor": "0"}),
    ("no id at all", dict.fromkeys(IMAP_KEYS, "")),
])
def test_imap_id_strings(parser: DeviceParser, device_id: str, expected: dict) -> None:
    assert parser.attributes("imap", device_id) == expected
    assert parser.attributes("imaps", device_id) == expected


@pytest.mark.parametrize(("device_id", "expected"), [
    ("Open-Xchange.Android.OX Mail/1.0.3 (OS: 7.1.1; device: Samsung/SM-G935F)",
     {"app.brand": "Open-Xchange", "os.family": "Android", "app.name": "OX Mail", "app.major": "1",
      "app.minor": "0", "os.major": "7", "os.minor": "1", "device.family": "Samsung/SM-G935F"}),
    ("Acme.iOS.Acme Drive/12.3 (OS: 17.1; device: iPhone15,2)",
     {"app.brand": "Acme", "os.family": "iOS", "app.name": "Acme Drive", "app.major": "12",
      "app.minor": "3", "os.major": "17", "os.minor": "1", "device.family": "iPhone15"}),
    ("garbage", dict.fromkeys(MOBILEAPI_KEYS, "")),
])
def test_mobileapi_ids(parser: DeviceParser, device_id: str, expected: dict) -> None:
    assert parser.attributes("mobileapi", device_id) == expected


def test_other_protocols_and_empty_ids_give_nothing(parser: DeviceParser) -> None:
    assert parser.attributes("pop3", CHROME_MAC) == {}
    assert parser.attributes("", CHROME_MAC) == {}
    assert parser.attributes("http", "") == {}


def test_repeated_device_ids_are_parsed_once() -> None:
    parser = DeviceParser()
    first = parser.attributes("http", CHROME_MAC)
    first["device.family"] = "changed by a caller"
    for _ in range(100):
        assert parser.attributes("https", CHROME_MAC)["device.family"] == "Mac"
    info = parser.cache_info()
    assert (info.misses, info.hits) == (1, 100)


def test_regexes_file_replaces_the_builtin_regexes(tmp_path) -> None:
    regexes = Path(__file__).parent / "data" / "acme-regexes.yaml"
    parser = DeviceParser(str(regexes))
    assert parser.attributes("http", "AcmeBrowser/3.4 (AcmeOS 2.1; AcmePhone)") == {
        "device.family": "AcmePhone", "device.brand": "Acme", "device.model": "Phone X",
        "os.family": "AcmeOS", "os.major": "2", "os.minor": "1",
        "browser.family": "AcmeBrowser", "browser.major": "3", "browser.minor": "4",
    }
    # only the file's regexes apply: Chrome is unknown to it
    assert parser.attributes("http", CHROME_MAC)["browser.family"] == "Other"
