"""javascript/lora_char_trainer.js in Node with a minimal page: a new epoch's Lora card is fetched alone
(A1111's /sd_extra_networks/get-single-card) and put into the Lora cards of txt2img and img2img, without
clicking the hidden refresh button that rebuilds every extra-networks page; the Train button's task id
lands where the tab says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "javascript" / "lora_char_trainer.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")

PAGE = r"""
const fs = require('fs'), vm = require('vm');
const events = [];
function cardList(tab) {
  return {
    cards: [],
    querySelectorAll() { return this.cards; },
    get firstChild() { return this.cards[0] || null; },
    insertBefore(card) { card.list = this; this.cards.unshift(card); },
  };
}
const lists = {txt2img_lora_cards: cardList('txt2img'), img2img_lora_cards: cardList('img2img')};
lists.txt2img_lora_cards.cards.push({dataset: {name: 'alice-000001'}, old: true,
  replaceWith(card) {
    const l = lists.txt2img_lora_cards; l.cards[l.cards.indexOf(this)] = card; card.list = l;
  }});
globalThis.window = globalThis;
globalThis.gradioApp = () => ({getElementById(id) {
  if (lists[id]) return lists[id];
  if (id.endsWith('_extra_refresh_internal')) return {dispatchEvent() { events.push('refresh every page'); }};
  return null;
}});
globalThis.document = {createElement() {
  const holder = {};
  Object.defineProperty(holder, 'innerHTML', {set(html) {
    holder.firstElementChild = {dataset: {name: /data-name="([^"]+)"/.exec(html)[1]}, style: {}, html,
      replaceWith(card) { const l = this.list; l.cards[l.cards.indexOf(this)] = card; card.list = l; }};
  }});
  return holder;
}};
globalThis.fetch = (url) => {
  events.push(url);
  const name = new URLSearchParams(url.split('?')[1]).get('name');
  const html = `<div class="card" data-name="${name}"></div>`;
  return Promise.resolve({ok: true, json: () => Promise.resolve({html})});
};
globalThis.randomId = () => 'task(js)';
vm.runInThisContext(fs.readFileSync(process.argv[2], 'utf8'));
"""
REFRESH_SCENARIO = r"""
window.lctRefreshLoraCards('["alice-000001", "alice-000002"]');
setTimeout(() => {
  window.lctRefreshLoraCards('["alice-000001", "alice-000002"]');  // the next poll: nothing again
  setTimeout(() => {
    const cards = {};
    for (const [id, list] of Object.entries(lists)) {
      cards[id] = list.cards.map(c => [c.dataset.name, !!c.old]);
    }
    const started = window.lctStartTraining(2, ['a', 'b', '', 'c']);
    console.log(JSON.stringify({events, cards, started}));
  }, 50);
}, 50);
"""


def run_page(tmp_path, scenario: str) -> dict:
    page = tmp_path / "page.js"
    page.write_text(PAGE + scenario, encoding="utf-8")
    output = subprocess.run(
        [NODE, str(page), str(SCRIPT)], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(output.stdout)


def test_new_epochs_refresh_only_their_own_lora_cards(tmp_path):
    result = run_page(tmp_path, REFRESH_SCENARIO)

    assert "refresh every page" not in result["events"]
    fetched = sorted(result["events"])
    assert len(fetched) == 4 and all(
        url.startswith("./sd_extra_networks/get-single-card?page=lora&") for url in fetched
    )
    assert result["cards"]["txt2img_lora_cards"] == [["alice-000002", False], ["alice-000001", False]]
    assert result["cards"]["img2img_lora_cards"] == [["alice-000002", False], ["alice-000001", False]]
    assert result["started"] == ["a", "b", "task(js)", "c"]


SCORED_SCENARIO = r"""
window.lctRefreshLoraCards('["alice-000001", "alice-000002"]');
setTimeout(() => {
  const before = lists.txt2img_lora_cards.cards.slice();
  events.length = 0;
  const scored = '{"job": "task(score-1)", "stems": ["alice-000001"]}';
  window.lctUpdateLoraCards(scored);
  window.lctUpdateLoraCards(scored);  // the next poll of the same job: nothing again
  window.lctUpdateLoraCards('not json');
  setTimeout(() => {
    const after = lists.txt2img_lora_cards.cards;
    console.log(JSON.stringify({
      events,
      names: after.map(c => c.dataset.name),
      replaced: after.map((c, i) => c !== before[i]),
    }));
  }, 50);
}, 50);
"""


def test_a_scored_run_fetches_the_rewritten_card_again_once(tmp_path):
    result = run_page(tmp_path, SCORED_SCENARIO)
    assert sorted(result["events"]) == [
        "./sd_extra_networks/get-single-card?page=lora&tabname=img2img&name=alice-000001",
        "./sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name=alice-000001",
    ]
    assert result["names"] == ["alice-000002", "alice-000001"]  # replaced in place, not added
    assert result["replaced"] == [False, True]
