/* MergeArena leaderboard: sort the table by a column and filter it by suite.
   State lives in the URL hash (#suite=<name>&sort=<column>&dir=asc|desc), so a sorted,
   filtered view is a link; clicking a header only rewrites the hash. */
(function () {
  "use strict";

  function readHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) { return; }
      var i = kv.indexOf("=");
      var key = decodeURIComponent(i < 0 ? kv : kv.slice(0, i));
      out[key] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
    });
    return out;
  }

  function writeHash(state) {
    var parts = [];
    ["suite", "sort", "dir"].forEach(function (key) {
      if (state[key]) { parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(state[key])); }
    });
    location.hash = parts.join("&");
  }

  function columnIndex(table, key) {
    var headers = table.tHead.rows[0].cells;
    for (var i = 0; i < headers.length; i++) {
      if (headers[i].getAttribute("data-key") === key) { return i; }
    }
    return -1;
  }

  function cellValue(row, index, type) {
    var raw = row.cells[index].getAttribute("data-value");
    if (raw === null || raw === "") { return null; }
    if (type === "number") {
      var n = Number(raw);
      return isNaN(n) ? null : n;
    }
    return raw.toLowerCase();
  }

  function sortTable(table, key, dir) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var index = key ? columnIndex(table, key) : -1;
    var headers = table.tHead.rows[0].cells;
    var type = index >= 0 ? headers[index].getAttribute("data-type") : "number";
    var sign = dir === "asc" ? 1 : -1;
    rows.sort(function (a, b) {
      var order = Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
      if (index < 0) { return order; }
      var x = cellValue(a, index, type);
      var y = cellValue(b, index, type);
      if (x === null && y === null) { return order; }
      if (x === null) { return 1; }   /* missing values last, whichever the direction */
      if (y === null) { return -1; }
      if (x < y) { return -sign; }
      if (x > y) { return sign; }
      return order;                    /* stable: ties keep the published order */
    });
    rows.forEach(function (row) { body.appendChild(row); });
    for (var i = 0; i < headers.length; i++) {
      if (i === index) {
        headers[i].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
      } else {
        headers[i].removeAttribute("aria-sort");
      }
    }
  }

  function filterSuite(suite) {
    var nodes = document.querySelectorAll("[data-suite]");
    for (var i = 0; i < nodes.length; i++) {
      var node = nodes[i];
      if (node.tagName === "SELECT") { continue; }
      node.hidden = Boolean(suite) && suite !== "all" && node.getAttribute("data-suite") !== suite;
    }
    var select = document.getElementById("suite-filter");
    if (select) { select.value = suite || "all"; }
  }

  function firstSuite() {
    /* one suite at a time: with no suite in the address, the first suite of the list (not the cross-suite summary) */
    var select = document.getElementById("suite-filter");
    if (!select) { return ""; }
    for (var i = 0; i < select.options.length; i++) {
      var v = select.options[i].value;
      if (v !== "all" && v !== "overall") { return v; }
    }
    return "";
  }

  function apply() {
    var state = readHash();
    var table = document.getElementById("leaderboard");
    filterSuite(state.suite === undefined ? firstSuite() : state.suite);
    if (table) { sortTable(table, state.sort || "", state.dir === "asc" ? "asc" : "desc"); }
  }

  function init() {
    var table = document.getElementById("leaderboard");
    if (table) {
      var headers = table.tHead.rows[0].cells;
      Array.prototype.forEach.call(headers, function (th) {
        var key = th.getAttribute("data-key");
        var button = th.querySelector("button");
        if (!key || !button) { return; }
        button.addEventListener("click", function () {
          var state = readHash();
          /* first click: the natural direction (numbers high first, rank and text A-Z) */
          var natural = (th.getAttribute("data-type") === "text" || key === "rank") ? "asc" : "desc";
          state.dir = state.sort === key ? (state.dir === "asc" ? "desc" : "asc") : natural;
          state.sort = key;
          writeHash(state);
        });
      });
    }
    var select = document.getElementById("suite-filter");
    if (select) {
      select.addEventListener("change", function () {
        var state = readHash();
        state.suite = select.value;
        writeHash(state);
      });
    }
    apply();
  }

  window.addEventListener("hashchange", apply);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
}());
