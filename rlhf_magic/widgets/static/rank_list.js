// The keyboard and drag view of the rlhf-magic ranking panel: an anywidget ESM module (see rank_view.py).
//
// It draws the state Python pushes (model "state": answers, ranks, display order, status line) and never ranks on
// its own: every key, click and drop goes to Python (a custom message, or the "order" traitlet for a reorder),
// which checks it and changes the panel's one ranking state; the new state comes back and is drawn again.
// Keys work while focus is anywhere in the panel (except text boxes), and stop there: JupyterLab's own shortcuts
// listen on the document in the bubbling phase, so a key pressed in the panel never reaches them, and the panel's
// keys never act outside it. Once it runs, this view replaces the click-to-rank cards (they stay where it cannot).

const MIME = "application/x-rlhf-rank-card"; // not text/plain: an editor never takes a dropped answer as text
const NOT_TYPING = ["checkbox", "radio", "button", "submit", "reset", "range", "color", "file"];
let views = 0;

function isTyping(t) {
  if (!t || !t.tagName) return false;
  if (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT") return true;
  return t.tagName === "INPUT" && !NOT_TYPING.includes((t.type || "text").toLowerCase());
}

function isControl(t) {
  return !!t && /^(BUTTON|INPUT|SELECT|TEXTAREA|A)$/.test(t.tagName || "");
}

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  e.append(...kids);
  return e;
}

function render({ model, el }) {
  const id = `rlhf-rv-${++views}`;
  const help = h("div", { class: "rlhf-rv-help", id: `${id}-help` });
  const list = h("div", {
    class: "rlhf-rv-list",
    role: "list",
    "aria-label": "Answers, best first",
    "aria-describedby": `${id}-help`,
  });
  const extra = h("div", { class: "rlhf-rv-extra" });
  const live = h("div", { class: "rlhf-rv-live", role: "status", "aria-live": "polite" });
  el.classList.add("rlhf-rv");
  el.append(help, list, extra, live);

  let root = null; // the panel (.rlhf-ranking-panel) once this view is in the page
  let token = null; // which prompt is drawn: a new one puts the roving focus on the top answer
  let active = null; // the answer that holds the list's one tab stop
  let keepFocus = false; // focus was in the list: a redraw puts it back on the active answer
  let submitting = false; // Enter was sent and no new state came yet: a second Enter is not a second Submit
  let dragFrom = null;
  let dropped = false;
  let drawLater = false;
  const hidden = [];
  const state = () => model.get("state") || {};
  const send = (msg) => model.send(msg);

  function setOrder(order) {
    model.set("order", order);
    model.save_changes();
  }

  function card(s, j) {
    const L = s.letters[j];
    const r = s.ranks[j];
    const k = s.answers.length;
    const tied = s.ranks.filter((x) => x === 1).length > 1;
    const best = r === 1 ? (tied ? "Tied best" : "Best") : "";
    const where = r ? `rank ${r} of ${k}${best ? `, ${best.toLowerCase()}` : ""}` : "not ranked yet";
    const label = `Answer ${L}, ${where}`;
    const body = h("div", { class: "rlhf-rv-text", id: `${id}-text-${j}` });
    if (s.answers[j].trim()) body.textContent = s.answers[j];
    else body.append(h("span", { class: "rlhf-rv-empty" }, "(empty answer)"));
    const ranks = h("span", { class: "rlhf-rv-ranks", role: "group", "aria-label": `Rank of answer ${L}` });
    for (let n = 1; n <= k && !s.pair; n++) {
      const attrs = { type: "button", tabindex: -1, class: "rlhf-rv-rank", "data-rank": n };
      attrs["aria-label"] = `Rank answer ${L} as ${n}`;
      attrs["aria-pressed"] = r === n ? "true" : "false";
      ranks.append(h("button", attrs, String(n)));
    }
    const head = h(
      "div",
      { class: "rlhf-rv-head" },
      h("span", { class: "rlhf-rv-handle", "aria-hidden": "true", title: "Drag to reorder" }, "\u283f"),
      h("span", { class: "rlhf-rv-letter", "aria-hidden": "true" }, L),
    );
    if (!s.pair) head.append(ranks); // two answers: the choice row below the list ranks them
    if (best) head.append(h("span", { class: "rlhf-rv-best", "aria-hidden": "true" }, best));
    const cls = `rlhf-rv-card rlhf-rv-card-${j} ${r ? "is-ranked" : "is-unset"}${best ? " is-best" : ""}`;
    const attrs = { class: cls, role: "listitem", tabindex: j === active ? 0 : -1, draggable: "true" };
    Object.assign(attrs, { "data-card": j, "aria-label": label, "aria-describedby": body.id });
    return h("div", attrs, head, body);
  }

  function draw() {
    if (dragFrom !== null) {
      drawLater = true; // never pull the dragged answer out of the page mid-drag
      return;
    }
    const s = state();
    const answers = s.answers || [];
    const order = s.order || [];
    if (s.token !== token) {
      token = s.token;
      active = order.length ? order[0] : null;
    }
    submitting = false;
    const ae = document.activeElement;
    const refocus = keepFocus && (!ae || ae === document.body || list.contains(ae));
    list.textContent = "";
    extra.textContent = "";
    help.hidden = list.hidden = answers.length === 0;
    if (answers.length) {
      const k = answers.length;
      const ranking = s.pair
        ? "1 makes it the better one, 2 the other \u00b7 T tie"
        : `1\u2013${k} rank it (0 clears) \u00b7 Alt+\u2191 \u2193 move it`;
      help.textContent =
        `Keys: \u2191 \u2193 choose an answer \u00b7 ${ranking} \u00b7 Enter submit \u00b7 S skip \u00b7 U undo ` +
        "\u00b7 F flag. Or drag the answers into order, best on top.";
      if (!order.includes(active)) active = order[0];
      for (const j of order) list.append(card(s, j));
      if (s.pair) extra.append(choices(s));
      if (refocus) focusCard(active);
    }
    if (live.textContent !== (s.status || "")) live.textContent = s.status || "";
  }

  function choices(s) {
    const row = h("div", { class: "rlhf-rv-choice", role: "group", "aria-label": "Which answer is better?" });
    const picked = { "1,2": "a", "2,1": "b", "1,1": "tie" }[s.ranks.join()] || "";
    for (const [pick, text] of [["a", "A is better"], ["tie", "Tie"], ["b", "B is better"]]) {
      const attrs = { type: "button", class: "rlhf-rv-pick", "data-pick": pick };
      attrs["aria-pressed"] = String(pick === picked);
      row.append(h("button", attrs, text));
    }
    return row;
  }

  function cards() {
    return [...list.querySelectorAll(".rlhf-rv-card")];
  }

  function focusCard(j) {
    const c = list.querySelector(`.rlhf-rv-card[data-card="${j}"]`);
    if (!c) return;
    for (const o of cards()) o.tabIndex = o === c ? 0 : -1;
    active = j;
    keepFocus = true;
    c.focus({ preventScroll: true });
    c.scrollIntoView({ block: "nearest" });
  }

  function step(j, key, order) {
    const pos = j === null ? -1 : order.indexOf(j);
    const back = key === "ArrowUp" || key === "ArrowLeft";
    let next;
    if (key === "Home") next = 0;
    else if (key === "End") next = order.length - 1;
    else if (pos < 0) next = Math.max(0, order.indexOf(active)); // into the list: the answer it left from
    else next = Math.max(0, Math.min(order.length - 1, pos + (back ? -1 : 1)));
    focusCard(order[next]);
  }

  function move(j, by, order) {
    const pos = order.indexOf(j);
    if (pos + by < 0 || pos + by >= order.length) return;
    const next = order.slice();
    next.splice(pos, 1);
    next.splice(pos + by, 0, j);
    active = j;
    keepFocus = true;
    setOrder(next);
  }

  function onKey(e) {
    const t = e.target;
    if (isTyping(t)) return; // typing in the comment or labeler box stays typing
    if ((e.ctrlKey || e.metaKey) && /^[a-z]$/i.test(e.key)) return; // Ctrl+S and the like stay JupyterLab's
    if (e.key !== "Tab") e.stopPropagation(); // no other key pressed in the panel reaches JupyterLab
    if (e.ctrlKey || e.metaKey) return;
    const c = t && t.closest ? t.closest(".rlhf-rv-card") : null;
    const j = c && list.contains(c) ? Number(c.dataset.card) : null;
    const s = state();
    const order = s.order || [];
    const key = e.key;
    const low = key.length === 1 ? key.toLowerCase() : key;
    let handled = true;
    if (/^[0-9]$/.test(key)) send({ action: "rank", card: j, rank: Number(key) });
    else if ((key === "Delete" || key === "Backspace") && j !== null) send({ action: "rank", card: j, rank: 0 });
    else if (/^(Arrow(Up|Down|Left|Right)|Home|End)$/.test(key) && order.length) {
      if (e.altKey && j !== null && key.startsWith("Arrow")) move(j, /Up|Left/.test(key) ? -1 : 1, order);
      else step(j, key, order);
    } else if (key === "Enter" && !isControl(t) && !e.shiftKey && !e.altKey) {
      if (!submitting) send({ action: "submit" }); // a focused button's own Enter clicks that button instead
      submitting = true;
    } else if (low === "s") send({ action: "skip" });
    else if (low === "u") send({ action: "undo" });
    else if (low === "f") send({ action: "flag" });
    else if (low === "t") send({ action: "tie" });
    else handled = false;
    if (handled) e.preventDefault();
  }

  function onKeyUp(e) {
    if (!isTyping(e.target) && !e.ctrlKey && !e.metaKey && e.key !== "Tab") e.stopPropagation();
  }

  list.addEventListener("focusin", (e) => {
    const c = e.target.closest(".rlhf-rv-card");
    keepFocus = true;
    if (!c || Number(c.dataset.card) === active) return;
    active = Number(c.dataset.card);
    for (const o of cards()) o.tabIndex = o === c ? 0 : -1;
  });
  list.addEventListener("focusout", (e) => {
    if (e.relatedTarget && !list.contains(e.relatedTarget)) keepFocus = false;
  });
  list.addEventListener("click", (e) => {
    const c = e.target.closest(".rlhf-rv-card");
    if (!c) return;
    const j = Number(c.dataset.card);
    const b = e.target.closest(".rlhf-rv-rank");
    const again = b && b.getAttribute("aria-pressed") === "true"; // a second click on a chosen rank clears it
    if (b) send({ action: "rank", card: j, rank: again ? 0 : Number(b.dataset.rank) });
    focusCard(j);
  });
  extra.addEventListener("click", (e) => {
    const b = e.target.closest(".rlhf-rv-pick");
    if (!b) return;
    const again = b.getAttribute("aria-pressed") === "true"; // a second click clears the choice
    if (b.dataset.pick === "tie" && !again) send({ action: "tie" });
    else send({ action: "rank", card: b.dataset.pick === "b" ? 1 : 0, rank: again ? 0 : 1 });
  });

  // ---- drag and drop (HTML5): the dropped order is the ranking, best on top -------------------------------------
  function slot(y) {
    const i = cards().findIndex((c) => {
      const r = c.getBoundingClientRect();
      return y < r.top + r.height / 2;
    });
    return i < 0 ? cards().length : i;
  }

  function mark(at) {
    const all = cards();
    all.forEach((c, i) => {
      c.classList.toggle("drop-before", i === at);
      c.classList.toggle("drop-after", at === all.length && i === all.length - 1);
    });
  }

  function dragDone() {
    for (const c of list.querySelectorAll(".is-dragging")) c.classList.remove("is-dragging");
    mark(-1);
    dragFrom = null;
    if (drawLater) {
      drawLater = false;
      draw();
    }
  }

  list.addEventListener("dragstart", (e) => {
    const c = e.target.closest ? e.target.closest(".rlhf-rv-card") : null;
    if (!c) return;
    dragFrom = Number(c.dataset.card);
    dropped = false;
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData(MIME, String(dragFrom));
    c.classList.add("is-dragging");
  });
  list.addEventListener("dragover", (e) => {
    if (dragFrom === null) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "move";
    mark(slot(e.clientY));
  });
  list.addEventListener("dragleave", (e) => {
    if (!list.contains(e.relatedTarget)) mark(-1);
  });
  list.addEventListener("drop", (e) => {
    if (dragFrom === null) return;
    e.preventDefault();
    e.stopPropagation();
    dropped = true;
    const before = state().order || [];
    const order = before.slice();
    const at = slot(e.clientY);
    const pos = order.indexOf(dragFrom);
    order.splice(pos, 1);
    order.splice(at > pos ? at - 1 : at, 0, dragFrom);
    const from = dragFrom;
    dragDone();
    if (order.join() !== before.join()) {
      active = from;
      keepFocus = true;
      setOrder(order);
    }
  });
  list.addEventListener("dragend", () => {
    if (dragFrom !== null && !dropped) send({ action: "drop_outside" });
    if (dragFrom !== null) dragDone();
  });

  // ---- joining the panel: keys on its root, the click cards hidden, Python told ---------------------------------
  let timer = null;
  function attach() {
    if (!el.isConnected) {
      timer = setTimeout(attach, 50); // the panel inserts this view after rendering it
      return;
    }
    timer = null;
    root = el.closest(".rlhf-ranking-panel") || el;
    root.addEventListener("keydown", onKey);
    root.addEventListener("keyup", onKeyUp);
    for (const part of root.querySelectorAll(".rlhf-cards, .rlhf-view-note")) {
      if (part.closest(".rlhf-ranking-panel") !== root) continue;
      hidden.push([part, part.style.getPropertyValue("display"), part.getAttribute("aria-hidden")]);
      part.style.setProperty("display", "none", "important");
      part.setAttribute("aria-hidden", "true");
    }
    send({ action: "ready" });
  }

  model.on("change:state", draw);
  draw();
  attach();
  return () => {
    model.off("change:state", draw);
    if (timer !== null) clearTimeout(timer);
    if (root) {
      root.removeEventListener("keydown", onKey);
      root.removeEventListener("keyup", onKeyUp);
    }
    for (const [part, display, aria] of hidden) {
      part.style.setProperty("display", display);
      if (aria === null) part.removeAttribute("aria-hidden");
      else part.setAttribute("aria-hidden", aria);
    }
  };
}

export default { render };
