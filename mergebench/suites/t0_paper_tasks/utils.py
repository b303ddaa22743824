"""ROUGE-L for the t0-paper generation configs, computed offline (``process_results: !function utils.X``)."""


def _rouge_l(reference, prediction):
    from rouge_score import rouge_scorer

    return {"rouge_l": rouge_scorer.RougeScorer(["rougeL"]).score(str(reference), str(prediction))["rougeL"].fmeasure}


def rouge_l_common_gen(doc, results):
    return _rouge_l(doc["target"], results[0])


def rouge_l_wiki_bio(doc, results):
    return _rouge_l(doc["target_text"], results[0])


def rouge_l_cnn_dailymail(doc, results):
    return _rouge_l(doc["highlights"], results[0])


def rouge_l_xsum(doc, results):
    return _rouge_l(doc["summary"], results[0])
