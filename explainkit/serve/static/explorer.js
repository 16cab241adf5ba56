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
  const fields = ["true", "pred", "correct", "conf_min", "conf_max", "sort", "desc", "per_page",
                  "vs", "outcome", "ids", "page"];
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
      const caption = `${item.true} → ${item.predicted} ${(100 * item.confidence).toFixed(1)}%`;
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

  async function confusion() {
    const box = document.getElementById("confusion");
    let data;
    try { data = await getJSON(`/api/runs/${run}/confusion`); } catch (err) {
      box.textContent = "error: " + err.message; return;
    }
    if (data.matrix) {
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

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "grid") gridPage();
  else if (page === "detail") detailPage();
});
