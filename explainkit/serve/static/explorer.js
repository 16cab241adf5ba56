// The explorer's pages: the grid (filters, confusion matrix, pages) and the detail view
// (methods, opacity, epochs). Plain JavaScript, no build step; every value shown comes from
// the server's JSON and is set as text, never as HTML.
"use strict";

function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// -- the grid ------------------------------------------------------------------------------

function gridPage() {
  const run = document.body.dataset.run;
  const form = document.getElementById("filters");
  const fields = ["true", "pred", "label", "has", "correct", "conf_min", "conf_max", "sort", "desc",
                  "per_page", "vs", "outcome", "ids", "page"];
  const start = new URLSearchParams(location.search);
  for (const name of fields) {
    const input = form.elements[name];
    if (!input || !start.has(name)) continue;
    if (input.type === "checkbox") input.checked = start.get(name) === "1";
    else input.value = start.get(name);
  }

  function query(withPage) {
    const q = new URLSearchParams();
    for (const name of fields) {
      const input = form.elements[name];
      if (!input || (name === "page" && !withPage)) continue;
      const value = input.type === "checkbox" ? (input.checked ? "1" : "") : input.value;
      if (value !== "") q.set(name, value);
    }
    return q;
  }

  async function load() {
    const q = query(true);
    history.replaceState(null, "", "?" + q.toString());
    const csv = query(false);
    csv.delete("per_page");
    document.getElementById("csv").href = `/api/runs/${run}/selection.csv?` + csv.toString();
    const status = document.getElementById("status");
    const grid = document.getElementById("grid");
    markCell();
    let data;
    try {
      data = await getJSON(`/api/runs/${run}/images?` + q.toString());
    } catch (err) {
      status.textContent = "error: " + err.message;
      status.className = "error";
      grid.replaceChildren();
      return;
    }
    status.className = "muted";
    status.textContent = `${data.total} images`;
    form.elements.page.value = data.page;
    const method = start.get("method");
    const back = encodeURIComponent(q.toString()) + (method ? "&method=" + encodeURIComponent(method) : "");
    grid.replaceChildren(...data.items.map((item) => {
      const caption = item.caption;
      const extra = item.score === undefined ? [] :
        [el("span", {textContent: `${form.elements.sort.value} ${item.score === null ? "–" : item.score.toFixed(3)}`})];
      return el("a", {
        className: "thumb" + (item.correct ? "" : " wrong"),
        href: `/runs/${run}/images/${item.index}?back=${back}`,
        title: item.source,
      }, [
        el("img", {src: `/img/${run}/${item.index}.png?size=112`, alt: item.source, loading: "lazy"}),
        el("span", {textContent: item.source, className: "source"}),
        el("span", {textContent: caption, className: "caption"}),
        ...extra,
      ]);
    }));
    document.getElementById("pageinfo").textContent = `page ${data.page + 1} of ${data.pages}`;
    document.getElementById("prev").disabled = data.page <= 0;
    document.getElementById("next").disabled = data.page >= data.pages - 1;
    loadCounts();
  }

  async function loadCounts() {
    const vs = form.elements.vs;
    const out = document.getElementById("compare-counts");
    if (!vs || !out) return;
    if (!vs.value) { out.textContent = ""; return; }
    const c = (await getJSON(`/api/runs/${run}/compare/${vs.value}`)).counts;
    out.textContent = `only this run right ${c.only_this} · only the other ${c.only_other} · ` +
      `both right ${c.both_right} · both wrong ${c.both_wrong}`;
  }

  function markCell() {
    if (form.elements.label) {  // a task run: a class and which of its sets
      const l = form.elements.label.value, h = form.elements.has.value;
      for (const cell of document.querySelectorAll("#confusion td.cell")) {
        cell.classList.toggle("on", cell.dataset.label === l && cell.dataset.has === h);
      }
      return;
    }
    const t = form.elements.true.value, p = form.elements.pred.value;
    for (const cell of document.querySelectorAll("#confusion td.cell")) {
      cell.classList.toggle("on", cell.dataset.true === t && cell.dataset.pred === p);
    }
  }

  function pick(t, p) {
    form.elements.true.value = t;
    form.elements.pred.value = p;
    form.elements.page.value = 0;
    load();
  }

  function pickLabel(label, has) {
    form.elements.label.value = label;
    form.elements.has.value = has;
    form.elements.page.value = 0;
    load();
  }

  function labelTable(data) {
    // a task run: per class, the images holding it in each set; a count filters to them
    const sets = [["true", "in truth"], ["pred", "predicted"], ["missed", "missed"], ["false", "false"]];
    const head = el("tr", {}, [el("th", {textContent: "class"}),
                               ...sets.map(([, title]) => el("th", {textContent: title}))]);
    const rows = data.labels.map((row, k) => el("tr", {}, [
      el("th", {textContent: row.class}),
      ...sets.map(([name]) => {
        const cell = el("td", {textContent: row[name],
          className: "cell " + (row[name] ? (name === "missed" || name === "false" ? "off" : "diag") : "")});
        cell.dataset.label = k; cell.dataset.has = name;
        cell.addEventListener("click", () => pickLabel(String(k), name));
        return cell;
      }),
    ]));
    return el("table", {}, [el("thead", {}, [head]), el("tbody", {}, rows)]);
  }

  async function confusion() {
    const box = document.getElementById("confusion");
    let data;
    try { data = await getJSON(`/api/runs/${run}/confusion`); } catch (err) {
      box.textContent = "error: " + err.message; return;
    }
    if (data.labels) {
      box.replaceChildren(labelTable(data));
    } else if (data.matrix) {
      const head = el("tr", {}, [el("th"), ...data.classes.map((c) => el("th", {textContent: c}))]);
      const rows = data.matrix.map((row, t) => el("tr", {}, [
        el("th", {textContent: data.classes[t]}),
        ...row.map((count, p) => {
          const cell = el("td", {textContent: count,
            className: "cell " + (t === p ? "diag" : count ? "off" : "")});
          cell.dataset.true = t; cell.dataset.pred = p;
          cell.addEventListener("click", () => pick(String(t), String(p)));
          return cell;
        }),
      ]));
      box.replaceChildren(el("table", {}, [el("thead", {}, [head]), el("tbody", {}, rows)]));
    } else {
      const rows = data.top.map((x) => {
        const cell = el("td", {textContent: x.count, className: "cell off"});
        cell.dataset.true = x.true; cell.dataset.pred = x.pred;
        cell.addEventListener("click", () => pick(String(x.true), String(x.pred)));
        return el("tr", {}, [el("td", {textContent: `${data.classes[x.true]} → ${data.classes[x.pred]}`}), cell]);
      });
      box.replaceChildren(el("p", {className: "muted", textContent: "the most frequent confusions"}),
                          el("table", {}, [el("tbody", {}, rows)]));
    }
    markCell();
  }

  form.addEventListener("change", (event) => {
    if (event.target.name !== "page") form.elements.page.value = 0;
    load();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("clear").addEventListener("click", () => {
    form.reset();
    form.elements.ids.value = "";
    form.elements.page.value = 0;
    load();
  });
  document.getElementById("prev").addEventListener("click", () => {
    form.elements.page.value = Math.max(0, Number(form.elements.page.value) - 1); load();
  });
  document.getElementById("next").addEventListener("click", () => {
    form.elements.page.value = Number(form.elements.page.value) + 1; load();
  });
  confusion();
  load();
}

// -- the detail view -----------------------------------------------------------------------

async function showPNG(img, url, errorBox) {
  // Fetched first so that a failed map shows the server's sentence, not a broken image.
  const response = await fetch(url);
  if (!response.ok) {
    errorBox.textContent = await response.text();
    errorBox.hidden = false;
    img.removeAttribute("src");
    return false;
  }
  const blob = await response.blob();
  await new Promise((resolve) => {
    img.onload = resolve; img.onerror = resolve;
    img.src = URL.createObjectURL(blob);
  });
  errorBox.hidden = true;
  return true;
}

function detailPage() {
  const params = new URLSearchParams(location.search);
  if (params.has("back")) {
    document.getElementById("back").href += "?" + params.get("back");
  }
  const select = document.getElementById("method");
  const overlay = document.getElementById("overlay");
  const opacity = document.getElementById("opacity");
  const errorBox = document.getElementById("overlay-error");
  const task = document.body.dataset.task;
  if (task === "segmentation") maskControls();
  if (task === "detection") boxControls();
  if (document.getElementById("item")) { itemControls(); return; }  // a task run's items
  if (!select) { overlay.dataset.ready = "none"; return; }  // a run without maps
  const wanted = params.get("method");
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;

  function setOpacity() {
    overlay.style.opacity = opacity.value;
    document.getElementById("opacity-value").textContent = opacity.value;
  }
  async function setMethod() {
    overlay.dataset.ready = "";
    const option = select.selectedOptions[0];
    if (option && await showPNG(overlay, option.dataset.url, errorBox)) {
      // a map computed for the overlay also fills its place in the side by side
      const button = document.querySelector(`figure.method[data-key="${select.value}"] button.compute`);
      if (button) button.replaceWith(el("img", {className: "px", src: overlay.src,
        width: button.dataset.width, height: button.dataset.height, alt: option.textContent}));
    }
    overlay.dataset.ready = select.value;
  }
  opacity.addEventListener("input", setOpacity);
  select.addEventListener("change", setMethod);
  setOpacity();
  setMethod();

  for (const button of document.querySelectorAll("button.compute")) {
    button.style.width = button.dataset.width + "px";
    button.style.height = button.dataset.height + "px";
    button.addEventListener("click", async () => {
      const figure = button.closest("figure");
      button.disabled = true;
      button.textContent = "computing…";
      const img = el("img", {className: "px", width: button.dataset.width, height: button.dataset.height});
      if (await showPNG(img, figure.dataset.url, figure.querySelector(".error"))) button.replaceWith(img);
      else button.textContent = "failed";
    });
  }
  const go = document.getElementById("epochs-go");
  if (go) {
    go.addEventListener("click", async () => {
      go.disabled = true;
      for (const figure of document.querySelectorAll("#epochs figure")) {
        await showPNG(figure.querySelector("img"), figure.dataset.url, figure.querySelector(".error"));
      }
    });
  }
}

// -- task runs: each item's map (a detection, a class region, a label) ---------------------------

function itemControls() {
  // The overlay shows the chosen method's map of the chosen item, the item's box or region
  // outlined; the side by side shows every method's map of that item (stored ones at once,
  // the others on a click, computed by the server).
  const item = document.getElementById("item");
  const select = document.getElementById("method");
  const overlay = document.getElementById("overlay");
  const opacity = document.getElementById("opacity");
  const errorBox = document.getElementById("overlay-error");
  const outline = document.getElementById("item-outline");
  const show = document.getElementById("show-item");
  const side = document.getElementById("item-maps");
  const params = new URLSearchParams(location.search);
  const wanted = params.get("method");
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
  if (params.has("item") && [...item.options].some((o) => o.value === params.get("item"))) {
    item.value = params.get("item");
  }
  const urlOf = (key) => item.selectedOptions[0].dataset.maps + key + ".png";

  function setOpacity() {
    overlay.style.opacity = opacity.value;
    document.getElementById("opacity-value").textContent = opacity.value;
  }
  function drawOutline() {
    outline.querySelector("path").setAttribute("d", item.selectedOptions[0].dataset.outline || "");
    outline.style.display = show && show.checked ? "" : "none";
  }
  function figure(option) {
    const w = side.dataset.width, h = side.dataset.height;
    const box = el("figure", {className: "method"}, [el("figcaption", {textContent: option.textContent}),
                                                     el("p", {className: "error", hidden: true})]);
    box.dataset.key = option.value;
    box.dataset.url = urlOf(option.value);
    const img = el("img", {className: "px", width: w, height: h, alt: option.textContent});
    if (option.dataset.stored) {
      box.prepend(img);
      showPNG(img, box.dataset.url, box.querySelector(".error"));
    } else {
      const button = el("button", {type: "button", className: "compute", textContent: "compute " + option.textContent});
      button.style.width = w + "px"; button.style.height = h + "px";
      button.addEventListener("click", async () => {
        button.disabled = true; button.textContent = "computing…";
        if (await showPNG(img, box.dataset.url, box.querySelector(".error"))) button.replaceWith(img);
        else button.textContent = "failed";
      });
      box.prepend(button);
    }
    return box;
  }
  async function setOverlay() {
    overlay.dataset.ready = "";
    const key = select.value, at = item.value;
    if (await showPNG(overlay, urlOf(key), errorBox)) {
      const button = side.querySelector(`figure.method[data-key="${key}"] button.compute`);
      if (button) button.replaceWith(el("img", {className: "px", src: overlay.src,
        width: side.dataset.width, height: side.dataset.height, alt: select.selectedOptions[0].textContent}));
    }
    if (key === select.value && at === item.value) overlay.dataset.ready = `${at}/${key}`;
  }
  function setItem() {
    drawOutline();
    side.replaceChildren(...[...select.options].map(figure));
    setOverlay();
  }
  opacity.addEventListener("input", setOpacity);
  select.addEventListener("change", setOverlay);
  item.addEventListener("change", setItem);
  if (show) show.addEventListener("change", drawOutline);
  setOpacity();
  setItem();
}

// -- task runs: segmentation masks and detection boxes over the image ---------------------------

function maskControls() {
  const which = document.getElementById("mask-which");
  const mask = document.getElementById("mask");
  const opacity = document.getElementById("mask-opacity");
  const errorBox = document.getElementById("overlay-error");
  function setOpacity() {
    mask.style.opacity = opacity.value;
    document.getElementById("mask-opacity-value").textContent = opacity.value;
  }
  async function setMask() {
    mask.dataset.ready = "";
    const option = which.selectedOptions[0];
    if (option.value) {
      mask.hidden = false;
      await showPNG(mask, option.dataset.url, errorBox);
    } else {
      mask.hidden = true;
    }
    mask.dataset.ready = option.value || "none";
  }
  opacity.addEventListener("input", setOpacity);
  which.addEventListener("change", setMask);
  setOpacity();
  setMask();
}

const BOX_COLOURS = {truth: "rgb(40,200,40)", missed: "rgb(255,40,40)", found: "rgb(60,120,255)",
                     false: "rgb(255,160,0)", low: "rgb(160,160,160)"};

async function boxControls() {
  const svg = document.getElementById("boxes");
  const run = document.body.dataset.run, image = document.body.dataset.image;
  const showTruth = document.getElementById("show-truth");
  const showPred = document.getElementById("show-pred");
  const minScore = document.getElementById("min-score");
  const info = await getJSON(`/api/runs/${run}/images/${image}`);
  const scale = svg.width.baseVal.value / svg.viewBox.baseVal.width;
  const NS = "http://www.w3.org/2000/svg";

  function box(b, colour, label) {
    const g = document.createElementNS(NS, "g");
    const rect = document.createElementNS(NS, "rect");
    const attrs = {x: b[0], y: b[1], width: Math.max(b[2] - b[0], 0), height: Math.max(b[3] - b[1], 0),
                   fill: "none", stroke: colour, "stroke-width": 2, "vector-effect": "non-scaling-stroke",
                   "shape-rendering": "crispEdges"};
    for (const [k, v] of Object.entries(attrs)) rect.setAttribute(k, v);
    const text = document.createElementNS(NS, "text");
    text.setAttribute("x", b[0] + 2 / scale);
    text.setAttribute("y", b[1] + 11 / scale);
    text.setAttribute("font-size", 10 / scale);
    text.setAttribute("fill", colour);
    text.textContent = label;
    const title = document.createElementNS(NS, "title");
    title.textContent = label;
    g.append(rect, text, title);
    return g;
  }
  function draw() {
    const threshold = Number(minScore.value);
    document.getElementById("min-score-value").textContent = minScore.value;
    const shapes = [];
    if (showPred.checked) {
      for (const d of info.detections) {
        if (d.score < threshold) continue;
        const colour = d.false ? BOX_COLOURS.false : d.score >= info.min_score ? BOX_COLOURS.found : BOX_COLOURS.low;
        shapes.push(box(d.box, colour, `${d.class} ${d.score.toFixed(2)}`));
      }
    }
    if (showTruth.checked) {
      for (const t of info.truth) {
        shapes.push(box(t.box, t.missed ? BOX_COLOURS.missed : BOX_COLOURS.truth, t.class));
      }
    }
    svg.replaceChildren(...shapes);
    svg.dataset.drawn = `${shapes.length}@${minScore.value}:${showTruth.checked}:${showPred.checked}`;
  }
  for (const input of [showTruth, showPred, minScore]) input.addEventListener("input", draw);
  for (const input of [showTruth, showPred]) input.addEventListener("change", draw);
  draw();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "grid") gridPage();
  else if (page === "detail") detailPage();
});
