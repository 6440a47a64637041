// Live refresh for ledgerflow's pages: every [data-live] element is fetched again
// from its URL every data-every ms and replaced, unless the page is hidden. On an
// instance page, a change of status reloads the page (its forms follow the instance)
// unless the user has started typing into one of them.
"use strict";
(function () {
  let dirty = false;
  document.addEventListener("input", function (event) {
    if (event.target.closest("form")) dirty = true;
  });
  function watch(box) {
    const every = parseInt(box.dataset.every || "3000", 10);
    async function tick() {
      if (!document.hidden) {
        try {
          const answer = await fetch(box.dataset.live, { credentials: "same-origin" });
          if (answer.ok) {
            const html = await answer.text();
            const status = answer.headers.get("x-status");
            if (box.dataset.status && status && status !== box.dataset.status && !dirty) {
              window.location.reload();
              return;
            }
            if (html !== box.innerHTML) box.innerHTML = html;
          } else if (answer.status === 401) {
            window.location.assign("/ui/sign-in");
            return;
          }
        } catch (error) {
          // The server is restarting or the network is down: try again later.
        }
      }
      window.setTimeout(tick, every);
    }
    window.setTimeout(tick, every);
  }
  document.querySelectorAll("[data-live]").forEach(watch);
})();
