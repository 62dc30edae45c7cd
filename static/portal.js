/* The Configuration Portal's only script (no inline script is allowed by its CSP):
   confirmation before destructive forms, and the cluster table that refreshes itself. */
"use strict";

document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

function cell(row, text, className) {
  var td = document.createElement("td");
  if (className) { td.className = className; }
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function badge(td, text, kind) {
  td.textContent = "";
  var span = document.createElement("span");
  span.className = "badge " + kind;
  span.textContent = text;
  td.appendChild(span);
}

function utc(epoch) {
  if (!epoch) { return "-"; }
  return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function taskForm(td, csrf, node, task) {
  var form = document.createElement("form");
  form.method = "post";
  form.action = "/cluster/task";
  form.className = "inline";
  [["csrf", csrf], ["node", node], ["task", task]].forEach(function (pair) {
    var input = document.createElement("input");
    input.type = "hidden";
    input.name = pair[0];
    input.value = pair[1];
    form.appendChild(input);
  });
  var button = document.createElement("button");
  button.type = "submit";
  button.className = "small";
  button.textContent = task;
  form.appendChild(button);
  td.appendChild(form);
}

function renderCluster(table, view) {
  var body = table.tBodies[0];
  var csrf = table.getAttribute("data-csrf");
  var version = document.getElementById("cluster-version");
  if (version) { version.textContent = view.policy_version === null ? "none" : view.policy_version; }
  body.textContent = "";
  view.nodes.forEach(function (n) {
    var row = document.createElement("tr");
    row.className = n.warnings.length ? "warn-row" : "";
    cell(row, n.name);
    var state = cell(row, "");
    if (!n.connected) { badge(state, "disconnected", "badge-bad"); }
    else if (n.draining) { badge(state, "draining", "badge-warn"); }
    else if (n.ready) { badge(state, "ready", "badge-ok"); }
    else { badge(state, "not ready", "badge-bad"); }
    cell(row, n.address);
    cell(row, n.policy_version === null ? "-" : String(n.policy_version));
    cell(row, utc(n.last_seen));
    cell(row, String(n.requests_per_second));
    cell(row, String(n.backlog_records));
    cell(row, String(n.dropped_records));
    cell(row, n.clock_offset === null ? "-" : (n.clock_offset >= 0 ? "+" : "") + n.clock_offset.toFixed(1) + " s");
    var warnings = cell(row, "");
    n.warnings.forEach(function (w) {
      var span = document.createElement("span");
      span.className = "warning";
      span.textContent = w;
      warnings.appendChild(span);
    });
    var actions = cell(row, "", "actions");
    if (n.connected) {
      ["reload", "drain", "resume"].forEach(function (task) { taskForm(actions, csrf, n.name, task); });
    } else {
      taskForm(actions, csrf, n.name, "remove");
    }
    body.appendChild(row);
  });
  if (!view.nodes.length) {
    var empty = document.createElement("tr");
    var td = cell(empty, "No slave has connected yet.", "help");
    td.colSpan = 11;
    body.appendChild(empty);
  }
}

function pollCluster(table) {
  var source = table.getAttribute("data-source");
  fetch(source, {credentials: "same-origin", headers: {"Accept": "application/json"}})
    .then(function (response) {
      if (!response.ok) { throw new Error("status " + response.status); }
      return response.json();
    })
    .then(function (view) { renderCluster(table, view); })
    .catch(function () { /* keep the last table; the next poll tries again */ })
    .finally(function () { window.setTimeout(function () { pollCluster(table); }, 5000); });
}

document.addEventListener("DOMContentLoaded", function () {
  var table = document.getElementById("cluster-table");
  if (table) { window.setTimeout(function () { pollCluster(table); }, 5000); }
  var period = document.getElementById("period-select");
  if (period) {
    var toggle = function () {
      var custom = period.value === "custom";
      period.form.querySelectorAll("input[type=datetime-local]").forEach(function (input) {
        input.disabled = !custom;
      });
    };
    period.addEventListener("change", toggle);
    toggle();
  }
});
