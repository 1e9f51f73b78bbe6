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
  replaceWith(card) { const l = lists.txt2img_lora_cards; l.cards[l.cards.indexOf(this)] = card; }});
globalThis.window = globalThis;
globalThis.gradioApp = () => ({getElementById(id) {
  if (lists[id]) return lists[id];
  if (id.endsWith('_extra_refresh_internal')) return {dispatchEvent() { events.push('refresh every page'); }};
  return null;
}});
globalThis.document = {createElement() {
  const holder = {};
  Object.defineProperty(holder, 'innerHTML', {set(html) {
    holder.firstElementChild = {dataset: {name: /data-name="([^"]+)"/.exec(html)[1]}, style: {}, html};
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


def test_new_epochs_refresh_only_their_own_lora_cards(tmp_path):
    page = tmp_path / "page.js"
    page.write_text(PAGE, encoding="utf-8")
    output = subprocess.run(
        [NODE, str(page), str(SCRIPT)], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(output.stdout)

    assert "refresh every page" not in result["events"]
    fetched = sorted(result["events"])
    assert len(fetched) == 4 and all(
        url.startswith("./sd_extra_networks/get-single-card?page=lora&") for url in fetched
    )
    assert result["cards"]["txt2img_lora_cards"] == [["alice-000002", False], ["alice-000001", False]]
    assert result["cards"]["img2img_lora_cards"] == [["alice-000002", False], ["alice-000001", False]]
    assert result["started"] == ["a", "b", "task(js)", "c"]
