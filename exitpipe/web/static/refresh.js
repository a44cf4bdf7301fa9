// Auto-refresh: fetch this same page again every data-refresh seconds and swap in its <main>.
// The server renders and escapes everything; this builds no markup and runs nothing it gets.
"use strict";
(function () {
  const seconds = Number(document.body.dataset.refresh || 0);
  const status = document.getElementById("refresh-status");
  if (!seconds || !status) return;
  async function refresh() {
    const pause = document.getElementById("pause");
    if (document.hidden || (pause && pause.checked)) return;
    const active = document.activeElement;
    if (active && active.closest("form")) return; // never swap a form from under the typing
    try {
      const reply = await fetch(location.href, { credentials: "same-origin" });
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      const page = new DOMParser().parseFromString(await reply.text(), "text/html");
      document.getElementById("main").replaceWith(page.getElementById("main"));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      status.textContent = "refresh failed: " + error.message;
    }
  }
  setInterval(refresh, seconds * 1000);
})();
