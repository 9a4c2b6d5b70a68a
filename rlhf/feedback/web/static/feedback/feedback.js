// rlhf feedback page: post forms with fetch, swap in the fragment the server returns,
// keyboard shortcuts, and retries that are safe because every form carries a submission id.
// Without JS the same forms still work (plain POST + redirect).
(() => {
  "use strict";
  const app = () => document.getElementById("app");
  const errorBox = () => document.getElementById("error");
  let busy = false;

  function showError(message) {
    const box = errorBox();
    box.textContent = message;
    box.hidden = !message;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function post(form, submitter) {
    if (busy) return;
    busy = true;
    app().classList.add("busy");
    const data = new URLSearchParams(new FormData(form));
    if (submitter && submitter.name) data.append(submitter.name, submitter.value);
    if (submitter) submitter.classList.add("pressed");
    try {
      for (let attempt = 0; ; attempt++) {
        let res;
        try {
          res = await fetch(form.action, {
            method: "POST",
            body: data,
            credentials: "same-origin",
            headers: { "X-Requested-With": "fetch" },
          });
        } catch (err) {
          // Network trouble: resend the very same body. The submission id makes it idempotent.
          if (attempt >= 5) {
            showError("Cannot reach the server; this rating is not saved yet. Try again.");
            return;
          }
          showError(`Connection problem, retrying (${attempt + 1})…`);
          await sleep(300 * 2 ** attempt);
          continue;
        }
        if (!res.ok) {
          showError((await res.text()) || `Error ${res.status}`);
          return;
        }
        showError("");
        app().innerHTML = await res.text();
        return;
      }
    } finally {
      busy = false;
      app().classList.remove("busy");
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-fetch")) return;
    event.preventDefault();
    post(form, event.submitter);
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
