// Character LoRA Trainer: the WebUI's own progress bar for training jobs, and Lora card refreshes.
// The tab's buttons call these through small inline wrappers, so the tab also works without them.

(function() {
    var attached = {};
    var cardsShown = {};

    // Show A1111's progress bar (step, ETA, loss from /internal/progress) for a job's task id.
    window.lctAttachProgress = function(taskId) {
        if (!taskId || attached[taskId] || typeof requestProgress !== 'function') {
            return;
        }
        var container = gradioApp().getElementById('lct_progressbar');
        if (!container) {
            return;
        }
        attached[taskId] = true;
        requestProgress(taskId, container, null, function() {
            delete attached[taskId];
        }, null, 120);
    };

    // The Train button: a fresh task id (the server runs the job under it) at the task id's place
    // among the submitted values, and its progress bar.
    window.lctStartTraining = function(taskIdIndex, args) {
        args = Array.from(args);
        if (typeof randomId === 'function') {
            args[taskIdIndex] = randomId();
            window.lctAttachProgress(args[taskIdIndex]);
        }
        return args;
    };

    // Put one Lora card into a tab's card list: A1111's /sd_extra_networks/get-single-card renders it
    // (the same route its extraNetworksRefreshSingleCard uses); an existing card is replaced, a new one
    // is added first. Nothing else is rebuilt: embeddings and checkpoints pages stay as they are
    // (A1111's hidden refresh button would reload every extra-networks page).
    function showLoraCard(tab, stem) {
        var cards = gradioApp().getElementById(tab + '_lora_cards');
        if (!cards || typeof fetch !== 'function') {
            return;
        }
        var query = new URLSearchParams({page: 'lora', tabname: tab, name: stem});
        fetch('./sd_extra_networks/get-single-card?' + query.toString())
            .then(function(response) {
                return response.ok ? response.json() : null;
            })
            .then(function(data) {
                if (!data || !data.html) {
                    return;
                }
                var holder = document.createElement('div');
                holder.innerHTML = data.html;
                var card = holder.firstElementChild;
                if (!card) {
                    return;
                }
                card.style.display = '';
                var old = Array.from(cards.querySelectorAll('.card')).find(function(element) {
                    return element.dataset.name === stem;
                });
                if (old) {
                    old.replaceWith(card);
                } else {
                    cards.insertBefore(card, cards.firstChild);
                }
                cardsShown[tab + '/' + stem] = true;
            })
            .catch(function() {});
    }

    // New epochs are already known to the Lora extension on the server (by stem); show their cards
    // in txt2img and img2img. stemsJson: a JSON list of the run's registered epoch stems.
    window.lctRefreshLoraCards = function(stemsJson) {
        var stems = [];
        try {
            stems = JSON.parse(stemsJson || '[]');
        } catch (error) {
            return;
        }
        ['txt2img', 'img2img'].forEach(function(tab) {
            stems.forEach(function(stem) {
                if (!cardsShown[tab + '/' + stem]) {
                    showLoraCard(tab, stem);
                }
            });
        });
    };

    // A finished scoring rewrote these cards (preferred weight, notes): fetch them again even when they
    // are shown, once per scoring job. cardsJson: {"job": task id, "stems": [...]}.
    var scoringsShown = {};
    window.lctUpdateLoraCards = function(cardsJson) {
        var cards = null;
        try {
            cards = JSON.parse(cardsJson || 'null');
        } catch (error) {
            return;
        }
        if (!cards || !Array.isArray(cards.stems) || scoringsShown[cards.job]) {
            return;
        }
        scoringsShown[cards.job] = true;
        ['txt2img', 'img2img'].forEach(function(tab) {
            cards.stems.forEach(function(stem) {
                showLoraCard(tab, stem);
            });
        });
    };
})();
