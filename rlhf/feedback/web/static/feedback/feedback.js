// rlhf feedback page. htmx (htmx.min.js, shipped beside this file) posts the forms (hx-post)
// and swaps the fragment the server answers into #app. This file adds what htmx does not do:
// keyboard shortcuts, an error line, ignoring keys and clicks while a rating is being saved,
// and retrying a POST whose answer was lost (safe: every form carries a submission id, so the
// server stores a retried submission once). Without JS the same forms post normally.
(() => {
  "use strict";
  const app = () => document.getElementById("app");
  let busy = false; // a request is in flight (or waiting to be retried)
  let retrying = false; // the next htmx:beforeRequest is our own retry
  let attempt = 0;
  let choice = {}; // the submit button's name/value of the form in flight (for retries)

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function done() {
    busy = false;
    attempt = 0;
    app().classList.remove("busy");
  }

  document.addEventListener(
    "click",
    (event) => {
      const button = event.target.closest && event.target.closest("#app button[type=submit]");
      if (!button) return;
      // htmx wires up swapped-in forms as the swap settles; a key pressed in that moment would
      // otherwise post the form natively (a whole page load). Make sure this one is wired now.
      if (button.form && window.htmx) htmx.process(button.form);
      if (!busy) choice = button.name ? { [button.name]: button.value } : {};
    },
    true,
  );

  document.addEventListener("htmx:beforeRequest", (event) => {
    if (busy && !retrying) {
      event.preventDefault(); // one rating at a time: a fast double press cannot rate the next card
      return;
    }
    retrying = false;
    busy = true;
    app().classList.add("busy");
  });

  document.addEventListener("htmx:afterRequest", (event) => {
    const xhr = event.detail.xhr;
    if (!xhr || xhr.status === 0) return; // no answer: htmx:sendError decides
    if (event.detail.successful) showError("");
    done();
  });

  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    showError(xhr.responseText || `Error ${xhr.status}`);
  });

  document.addEventListener("htmx:sendError", (event) => {
    const form = event.detail.elt;
    const path = event.detail.requestConfig && event.detail.requestConfig.path;
    if (attempt >= 5 || !form || !path) {
      showError("Cannot reach the server; this rating is not saved yet. Try again.");
      done();
      return;
    }
    attempt += 1;
    showError(`Connection problem, retrying (${attempt})…`);
    // Resend the very same form (same submission id) with the same button's value.
    setTimeout(() => {
      retrying = true;
      htmx.ajax("POST", path, { source: form, target: "#app", swap: "innerHTML", values: choice });
    }, 300 * 2 ** (attempt - 1));
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target.closest && event.target.closest("input, textarea, select, [contenteditable]")) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : "";
    if (!key) return;
    const button = [...document.querySelectorAll("#app button[data-key]")].find(
      (b) => b.dataset.key === key,
    );
    if (!button || button.disabled || busy) return;
    event.preventDefault();
    button.click(); // submits its form with this button as the submitter
  });
})();
